"""The mock upstream, exercised over real sockets with the official SDKs and raw aiohttp."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from gateway.mock import (
    COMPLETION_WORDS,
    DEFAULT_COMPLETION_TOKENS,
    MockUpstreamThread,
    completion_text,
    start_mock_upstream_in_thread,
    start_mock_upstream_process,
)
from gateway.mock.server import DEFAULT_EMBEDDING_DIMENSIONS, embedding_vector
from gateway.tokens import (
    embedding_input_tokens,
    messages_tokens,
    responses_input_tokens,
    text_tokens,
)

SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstreamThread]:
    with start_mock_upstream_in_thread() as upstream:
        yield upstream


@pytest.fixture
def oai(mock: MockUpstreamThread) -> openai.OpenAI:
    # No retries: a retried 5xx would hide what the mock sent.
    return openai.OpenAI(base_url=mock.openai_base_url, api_key="sk-mock", max_retries=0)


@pytest.fixture
def claude(mock: MockUpstreamThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mock.anthropic_base_url, api_key="sk-mock", max_retries=0)


def openai_messages(text: str) -> Any:  # Any: the SDKs type messages as TypedDicts
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "an earlier turn [mock:tokens=99]"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": text},
    ]


def anthropic_messages(text: str) -> Any:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def raw_post(url: str, body: dict[str, Any]) -> tuple[int, bytes, BaseException | None]:
    """POST and read the whole response; returns (status, bytes read, error that cut the read)."""

    async def go() -> tuple[int, bytes, BaseException | None]:
        received = b""
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
            try:
                async for chunk in response.content.iter_any():
                    received += chunk
            except aiohttp.ClientError as exc:
                return response.status, received, exc
            return response.status, received, None

    return asyncio.run(go())


def sse_data(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ")
        assert data_line.startswith("data: ")
        events.append((event_line[7:], json.loads(data_line[6:])))
    return events


# --- the token rules ---------------------------------------------------------------------------


def test_every_completion_word_is_one_token() -> None:
    assert [text_tokens(word) for word in COMPLETION_WORDS] == [1] * len(COMPLETION_WORDS)


@pytest.mark.parametrize("tokens", [0, 1, 2, 15, 16, 17, 100, 1000])
def test_completion_text_of_n_tokens_counts_n_tokens(tokens: int) -> None:
    assert text_tokens(completion_text(tokens)) == tokens


# --- OpenAI Chat Completions -------------------------------------------------------------------


def test_openai_non_stream_returns_default_completion_with_exact_usage(oai: openai.OpenAI) -> None:
    messages = openai_messages("hello")

    completion = oai.chat.completions.create(model="mock-model", messages=messages)

    assert completion.choices[0].message.content == completion_text(DEFAULT_COMPLETION_TOKENS)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "mock-model"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == messages_tokens(messages)
    assert completion.usage.completion_tokens == DEFAULT_COMPLETION_TOKENS
    assert completion.usage.total_tokens == messages_tokens(messages) + DEFAULT_COMPLETION_TOKENS


def test_openai_stream_sends_one_content_chunk_per_token(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="mock-model", messages=openai_messages("[mock:tokens=7]"), stream=True
    )

    contents = [
        chunk.choices[0].delta.content for chunk in stream if chunk.choices[0].delta.content
    ]

    assert contents == list(COMPLETION_WORDS[:7])


def test_openai_stream_without_include_usage_has_no_usage_chunk(mock: MockUpstreamThread) -> None:
    body = {"model": "m", "messages": openai_messages("[mock:tokens=3]"), "stream": True}

    status, raw, error = raw_post(f"{mock.openai_base_url}/chat/completions", body)

    data = sse_data(raw)
    assert (status, error, data[-1]) == (200, None, "[DONE]")
    chunks = [json.loads(item) for item in data[:-1]]
    assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_stream_with_include_usage_ends_with_exact_usage_chunk(oai: openai.OpenAI) -> None:
    messages = openai_messages("[mock:tokens=5]")

    chunks = list(
        oai.chat.completions.create(
            model="mock-model",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        messages_tokens(messages),
        5,
    )
    assert all(chunk.usage is None for chunk in chunks[:-1])


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_openai_max_tokens_caps_the_completion(
    oai: openai.OpenAI, cap_field: str, stream: bool
) -> None:
    params: dict[str, Any] = {
        "model": "mock-model",
        "messages": openai_messages("[mock:tokens=10]"),
        cap_field: 4,
    }
    if stream:
        chunks = list(
            oai.chat.completions.create(
                **params, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        completion = oai.chat.completions.create(**params)
        text = completion.choices[0].message.content or ""
        finish = completion.choices[0].finish_reason
        usage = completion.usage

    assert (text, finish) == (completion_text(4), "length")
    assert usage is not None
    assert usage.completion_tokens == 4


def test_openai_n_choices_stream_each_choice_fully_and_bill_all(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="mock-model",
            messages=openai_messages("[mock:tokens=5]"),
            n=3,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [completion_text(5)] * 3
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 15


def test_openai_n_choices_non_stream_bills_all(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="mock-model", messages=openai_messages("[mock:tokens=4]"), n=2
    )

    assert [choice.message.content for choice in completion.choices] == [completion_text(4)] * 2
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8


def test_openai_delay_is_spent_before_each_chunk(oai: openai.OpenAI) -> None:
    started = time.monotonic()
    stream = oai.chat.completions.create(
        model="mock-model",
        messages=openai_messages("[mock:tokens=5] [mock:delay_ms=80]"),
        stream=True,
    )
    arrivals = [time.monotonic() - started for chunk in stream if chunk.choices[0].delta.content]

    assert len(arrivals) == 5
    assert arrivals[0] >= 0.08
    assert 0.4 <= arrivals[-1] < 2.0


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_openai_fail_before_first_chunk_is_a_500_with_an_openai_error(
    mock: MockUpstreamThread, stream: bool
) -> None:
    body = {
        "model": "m",
        "messages": openai_messages("[mock:fail=before_first_chunk]"),
        "stream": stream,
    }

    status, raw, _ = raw_post(f"{mock.openai_base_url}/chat/completions", body)

    assert status == 500
    assert json.loads(raw) == {
        "error": {
            "message": "mock upstream failed before the first chunk",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


def test_openai_sdk_sees_fail_before_first_chunk_as_internal_server_error(
    oai: openai.OpenAI,
) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        oai.chat.completions.create(
            model="mock-model",
            messages=openai_messages("[mock:fail=before_first_chunk]"),
            stream=True,
        )
    assert raised.value.status_code == 500


def test_openai_fail_mid_stream_cuts_the_connection_after_half_the_tokens(
    mock: MockUpstreamThread,
) -> None:
    body = {
        "model": "m",
        "messages": openai_messages("[mock:tokens=10] [mock:fail=mid_stream]"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    status, raw, error = raw_post(f"{mock.openai_base_url}/chat/completions", body)

    assert status == 200
    assert isinstance(error, aiohttp.ClientPayloadError)
    data = sse_data(raw)
    assert "[DONE]" not in data
    chunks = [json.loads(item) for item in data]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert contents == ["", *COMPLETION_WORDS[:5]]
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in chunks)


def test_openai_fail_mid_stream_sends_at_least_one_token(mock: MockUpstreamThread) -> None:
    body = {
        "model": "m",
        "messages": openai_messages("[mock:tokens=1] [mock:fail=mid_stream]"),
        "stream": True,
    }

    _, raw, error = raw_post(f"{mock.openai_base_url}/chat/completions", body)

    assert error is not None
    contents = [json.loads(item)["choices"][0]["delta"]["content"] for item in sse_data(raw)]
    assert contents == ["", COMPLETION_WORDS[0]]


def test_openai_fail_mid_stream_non_stream_drops_the_connection(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(
            model="mock-model", messages=openai_messages("[mock:fail=mid_stream]")
        )


@pytest.mark.parametrize(
    ("status", "error_type", "code", "sdk_error"),
    [
        (400, "invalid_request_error", None, openai.BadRequestError),
        (429, "requests", "rate_limit_exceeded", openai.RateLimitError),
        (500, "server_error", None, openai.InternalServerError),
        (503, "server_error", None, openai.InternalServerError),
    ],
    ids=["400", "429", "500", "503"],
)
def test_openai_status_directive_returns_that_status_with_an_openai_error(
    oai: openai.OpenAI, status: int, error_type: str, code: str | None, sdk_error: type[Exception]
) -> None:
    with pytest.raises(sdk_error) as raised:
        oai.chat.completions.create(
            model="mock-model", messages=openai_messages(f"[mock:status={status}]"), stream=True
        )

    assert isinstance(raised.value, openai.APIStatusError)
    assert raised.value.status_code == status
    assert raised.value.response.json() == {
        "error": {
            "message": f"mock upstream status {status}",
            "type": error_type,
            "param": None,
            "code": code,
        }
    }


def test_openai_no_usage_omits_the_usage_chunk_even_when_asked(mock: MockUpstreamThread) -> None:
    body = {
        "model": "m",
        "messages": openai_messages("[mock:tokens=3] [mock:no_usage]"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    _, raw, error = raw_post(f"{mock.openai_base_url}/chat/completions", body)

    data = sse_data(raw)
    assert (error, data[-1]) == (None, "[DONE]")
    chunks = [json.loads(item) for item in data[:-1]]
    assert len(chunks) == 1 + 3 + 1
    assert all(chunk["choices"] and chunk["usage"] is None for chunk in chunks)


def test_openai_no_usage_non_stream_has_no_usage_object(mock: MockUpstreamThread) -> None:
    body = {"model": "m", "messages": openai_messages("[mock:no_usage]")}

    status, raw, _ = raw_post(f"{mock.openai_base_url}/chat/completions", body)

    response = json.loads(raw)
    assert status == 200
    assert "usage" not in response
    assert response["choices"][0]["message"]["content"] == completion_text(16)


def test_openai_cached_tokens_are_reported_inside_prompt_tokens(oai: openai.OpenAI) -> None:
    messages = openai_messages("[mock:cached_tokens=12] [mock:tokens=2]")

    completion = oai.chat.completions.create(model="mock-model", messages=messages)

    assert completion.usage is not None
    assert completion.usage.prompt_tokens == messages_tokens(messages)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 12


def test_openai_cached_tokens_never_exceed_the_prompt(oai: openai.OpenAI) -> None:
    messages = openai_messages("[mock:cached_tokens=100000]")

    completion = oai.chat.completions.create(model="mock-model", messages=messages)

    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == messages_tokens(messages)


def test_openai_reasoning_tokens_are_counted_inside_completion_tokens(
    oai: openai.OpenAI,
) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="mock-model",
            messages=openai_messages("[mock:tokens=4] [mock:reasoning_tokens=6]"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text == completion_text(4)
    assert usage is not None
    assert usage.completion_tokens == 10
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 6


def test_openai_reasoning_tokens_spend_the_max_tokens_budget_first(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="mock-model",
        messages=openai_messages("[mock:tokens=10] [mock:reasoning_tokens=6]"),
        max_completion_tokens=8,
    )

    assert completion.choices[0].message.content == completion_text(2)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8


def test_openai_list_parts_content_is_read_for_directives(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "[mock:tokens=3]"}]}]

    completion = oai.chat.completions.create(model="mock-model", messages=messages)

    assert completion.choices[0].message.content == completion_text(3)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "[mock:tokens=lots]"}]},
            "messages",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "[mock:explode]"}]}, "messages"),
    ],
    ids=[
        "no-model",
        "no-messages",
        "n-zero",
        "max-tokens-zero",
        "bad-directive",
        "unknown-directive",
    ],
)
def test_openai_bad_request_is_a_400_naming_the_param(
    mock: MockUpstreamThread, body: dict[str, Any], param: str
) -> None:
    status, raw, _ = raw_post(f"{mock.openai_base_url}/chat/completions", body)

    error = json.loads(raw)["error"]
    assert (status, error["type"], error["param"]) == (400, "invalid_request_error", param)


def test_openai_models_lists_the_mock_model(oai: openai.OpenAI) -> None:
    assert [model.id for model in oai.models.list()] == ["mock-model"]


# --- Anthropic Messages ------------------------------------------------------------------------


def test_anthropic_non_stream_returns_the_completion_with_exact_usage(
    claude: anthropic.Anthropic,
) -> None:
    messages = anthropic_messages("[mock:tokens=9]")

    message = claude.messages.create(
        model="mock-model",
        max_tokens=100,
        system=SYSTEM,
        messages=messages,
    )

    assert message.content[0].type == "text"
    assert message.content[0].text == completion_text(9)
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        messages_tokens(messages, system=SYSTEM),
        9,
    )
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (
        0,
        0,
    )


def test_anthropic_stream_sends_the_provider_event_sequence(mock: MockUpstreamThread) -> None:
    messages = anthropic_messages("[mock:tokens=3]")
    body = {"model": "m", "max_tokens": 50, "messages": messages, "stream": True}

    status, raw, error = raw_post(f"{mock.anthropic_base_url}/v1/messages", body)

    events = sse_events(raw)
    assert (status, error) == (200, None)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)
    prompt = messages_tokens(messages)
    assert events[0][1]["message"]["usage"] == {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    assert [data["delta"] for _, data in events[3:6]] == [
        {"type": "text_delta", "text": word} for word in COMPLETION_WORDS[:3]
    ]
    assert events[7][1]["delta"]["stop_reason"] == "end_turn"
    assert events[7][1]["usage"]["output_tokens"] == 3


def test_anthropic_sdk_stream_accumulates_exact_final_usage(claude: anthropic.Anthropic) -> None:
    messages = anthropic_messages("[mock:tokens=12]")

    with claude.messages.stream(
        model="mock-model",
        max_tokens=100,
        system=SYSTEM,
        messages=messages,
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()

    assert texts == list(COMPLETION_WORDS[:12])
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        messages_tokens(messages, system=SYSTEM),
        12,
    )


def test_anthropic_max_tokens_caps_the_completion(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="mock-model",
        max_tokens=5,
        messages=anthropic_messages("[mock:tokens=40]"),
    )

    assert message.content[0].type == "text"
    assert message.content[0].text == completion_text(5)
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 5)


def test_anthropic_max_tokens_is_required(mock: MockUpstreamThread) -> None:
    body = {"model": "m", "messages": anthropic_messages("hi")}

    status, raw, _ = raw_post(f"{mock.anthropic_base_url}/v1/messages", body)

    assert status == 400
    assert json.loads(raw) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


def test_anthropic_delay_is_spent_before_each_delta(claude: anthropic.Anthropic) -> None:
    started = time.monotonic()
    with claude.messages.stream(
        model="mock-model",
        max_tokens=100,
        messages=anthropic_messages("[mock:tokens=4] [mock:delay_ms=100]"),
    ) as stream:
        arrivals = [time.monotonic() - started for _ in stream.text_stream]

    assert len(arrivals) == 4
    assert arrivals[0] >= 0.1
    assert 0.4 <= arrivals[-1] < 2.0


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_anthropic_fail_before_first_chunk_is_a_500_with_an_anthropic_error(
    mock: MockUpstreamThread, stream: bool
) -> None:
    body = {
        "model": "m",
        "max_tokens": 10,
        "messages": anthropic_messages("[mock:fail=before_first_chunk]"),
        "stream": stream,
    }

    status, raw, _ = raw_post(f"{mock.anthropic_base_url}/v1/messages", body)

    assert status == 500
    assert json.loads(raw) == {
        "type": "error",
        "error": {"type": "api_error", "message": "mock upstream failed before the first chunk"},
    }


def test_anthropic_fail_mid_stream_cuts_the_connection_after_half_the_tokens(
    mock: MockUpstreamThread,
) -> None:
    body = {
        "model": "m",
        "max_tokens": 100,
        "messages": anthropic_messages("[mock:tokens=9] [mock:fail=mid_stream]"),
        "stream": True,
    }

    status, raw, error = raw_post(f"{mock.anthropic_base_url}/v1/messages", body)

    assert status == 200
    assert isinstance(error, aiohttp.ClientPayloadError)
    events = sse_events(raw)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
    ]


def test_anthropic_fail_mid_stream_non_stream_drops_the_connection(
    claude: anthropic.Anthropic,
) -> None:
    with pytest.raises(anthropic.APIConnectionError):
        claude.messages.create(
            model="mock-model",
            max_tokens=10,
            messages=anthropic_messages("[mock:fail=mid_stream]"),
        )


@pytest.mark.parametrize(
    ("status", "error_type", "sdk_error"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (503, "overloaded_error", anthropic.InternalServerError),
        (529, "overloaded_error", anthropic.APIStatusError),
    ],
    ids=["400", "429", "500", "503", "529"],
)
def test_anthropic_status_directive_returns_that_status_with_an_anthropic_error(
    claude: anthropic.Anthropic, status: int, error_type: str, sdk_error: type[Exception]
) -> None:
    with pytest.raises(sdk_error) as raised:
        claude.messages.create(
            model="mock-model",
            max_tokens=10,
            messages=anthropic_messages(f"[mock:status={status}]"),
            stream=True,
        )

    assert isinstance(raised.value, anthropic.APIStatusError)
    assert raised.value.status_code == status
    assert raised.value.response.json() == {
        "type": "error",
        "error": {"type": error_type, "message": f"mock upstream status {status}"},
    }


def test_anthropic_no_usage_omits_usage_from_every_event(mock: MockUpstreamThread) -> None:
    body = {
        "model": "m",
        "max_tokens": 100,
        "messages": anthropic_messages("[mock:tokens=2] [mock:no_usage]"),
        "stream": True,
    }

    _, raw, error = raw_post(f"{mock.anthropic_base_url}/v1/messages", body)

    events = sse_events(raw)
    assert error is None
    assert events[-1][0] == "message_stop"
    assert "usage" not in events[0][1]["message"]
    assert all("usage" not in data for _, data in events)


def test_anthropic_no_usage_non_stream_has_no_usage_object(mock: MockUpstreamThread) -> None:
    body = {"model": "m", "max_tokens": 100, "messages": anthropic_messages("[mock:no_usage]")}

    status, raw, _ = raw_post(f"{mock.anthropic_base_url}/v1/messages", body)

    message = json.loads(raw)
    assert status == 200
    assert "usage" not in message
    assert message["content"] == [{"type": "text", "text": completion_text(16)}]


def test_anthropic_cache_tokens_are_reported_beside_input_tokens(
    claude: anthropic.Anthropic,
) -> None:
    messages = anthropic_messages(
        "[mock:cached_tokens=7] [mock:cache_write_tokens=3] [mock:tokens=1]"
    )

    message = claude.messages.create(
        model="mock-model",
        max_tokens=100,
        system=SYSTEM,
        messages=messages,
    )

    prompt = messages_tokens(messages, system=SYSTEM)
    usage = message.usage
    assert (
        usage.input_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    ) == (
        prompt - 10,
        7,
        3,
    )


def test_anthropic_stream_message_delta_usage_is_cumulative(mock: MockUpstreamThread) -> None:
    messages = anthropic_messages("[mock:cached_tokens=4] [mock:tokens=6]")
    body = {"model": "m", "max_tokens": 100, "messages": messages, "stream": True}

    _, raw, _ = raw_post(f"{mock.anthropic_base_url}/v1/messages", body)

    delta_usage = dict(sse_events(raw))["message_delta"]["usage"]
    assert delta_usage == {
        "input_tokens": messages_tokens(messages) - 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
        "output_tokens": 6,
    }


# --- serving -----------------------------------------------------------------------------------


def test_mock_serves_32_concurrent_streams_completely(mock: MockUpstreamThread) -> None:
    body = {
        "model": "m",
        "messages": openai_messages("[mock:tokens=50] [mock:delay_ms=1]"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one(session: aiohttp.ClientSession) -> list[str]:
        async with session.post(f"{mock.openai_base_url}/chat/completions", json=body) as response:
            return sse_data(await response.read())

    async def many() -> list[list[str]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session) for _ in range(32)))

    results = asyncio.run(many())

    # role chunk + 50 tokens + finish chunk + usage chunk + [DONE], for every client
    assert [len(data) for data in results] == [54] * 32
    assert all(json.loads(data[-2])["usage"]["completion_tokens"] == 50 for data in results)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_run_mock_upstream_command_serves_on_the_given_port_and_stops_cleanly() -> None:
    port = free_port()

    upstream = start_mock_upstream_process(port=port)
    try:
        client = openai.OpenAI(base_url=upstream.openai_base_url, api_key="sk-mock", max_retries=0)
        completion = client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "[mock:tokens=2]"}]
        )
    finally:
        upstream.stop()

    assert upstream.port == port
    assert completion.choices[0].message.content == completion_text(2)
    assert upstream.process.returncode == 0


# --- OpenAI Responses --------------------------------------------------------------------------


def responses_input(text: str) -> Any:
    return [
        {"role": "user", "content": "an earlier turn [mock:tokens=99]"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "input_text", "text": text}]},
    ]


def test_responses_non_stream_returns_the_completion_with_exact_usage(oai: openai.OpenAI) -> None:
    items = responses_input("hello [mock:tokens=6]")

    response = oai.responses.create(model="mock-model", input=items, instructions=SYSTEM)

    assert response.output_text == completion_text(6)
    assert response.status == "completed"
    assert response.usage is not None
    assert response.usage.input_tokens == responses_input_tokens(items, instructions=SYSTEM)
    assert response.usage.output_tokens == 6
    assert response.usage.total_tokens == response.usage.input_tokens + 6


def test_responses_string_input_is_one_user_message(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="mock-model", input="hi [mock:tokens=2]")

    assert response.usage is not None
    assert response.usage.input_tokens == messages_tokens(
        [{"role": "user", "content": "hi [mock:tokens=2]"}]
    )
    assert response.output_text == completion_text(2)


def test_responses_stream_sends_openais_typed_event_sequence(mock: MockUpstreamThread) -> None:
    body = {"model": "m", "input": "go [mock:tokens=3]", "stream": True}

    status, raw, error = raw_post(f"{mock.openai_base_url}/responses", body)

    events = sse_events(raw)
    assert (status, error) == (200, None)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(payload["type"] == name for name, payload in events)
    assert [payload["sequence_number"] for _, payload in events] == list(range(len(events)))
    assert [p["delta"] for n, p in events if n.endswith(".delta")] == list(COMPLETION_WORDS[:3])
    assert events[0][1]["response"]["usage"] is None
    final = events[-1][1]["response"]
    assert final["usage"]["output_tokens"] == 3
    assert final["output"][0]["content"][0]["text"] == completion_text(3)


def test_responses_sdk_stream_accumulates_the_final_response(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="mock-model", input="go [mock:tokens=4]") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()

    assert "".join(deltas) == final.output_text == completion_text(4)
    assert final.usage is not None and final.usage.output_tokens == 4


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_responses_max_output_tokens_caps_the_completion_as_incomplete(
    mock: MockUpstreamThread, stream: bool
) -> None:
    body = {"model": "m", "input": "[mock:tokens=40]", "max_output_tokens": 16, "stream": stream}

    _, raw, _ = raw_post(f"{mock.openai_base_url}/responses", body)

    response = sse_events(raw)[-1][1]["response"] if stream else json.loads(raw)
    if stream:
        assert sse_events(raw)[-1][0] == "response.incomplete"
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"]["output_tokens"] == 16


def test_responses_token_classes_are_inside_input_and_output(oai: openai.OpenAI) -> None:
    items = responses_input("[mock:tokens=5] [mock:cached_tokens=4] [mock:reasoning_tokens=3]")

    response = oai.responses.create(model="mock-model", input=items)

    assert response.usage is not None
    assert response.usage.input_tokens == responses_input_tokens(items)
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert response.usage.output_tokens == 8
    assert response.usage.output_tokens_details.reasoning_tokens == 3
    assert [item.type for item in response.output] == ["reasoning", "message"]


def test_responses_fail_mid_stream_ends_with_an_error_event_after_half_the_tokens(
    mock: MockUpstreamThread,
) -> None:
    body = {"model": "m", "input": "[mock:tokens=10] [mock:fail=mid_stream]", "stream": True}

    _, raw, _ = raw_post(f"{mock.openai_base_url}/responses", body)

    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names.count("response.output_text.delta") == 5
    assert names[-1] == "error" and "response.completed" not in names
    assert events[-1][1]["type"] == "error" and events[-1][1]["message"]


@pytest.mark.parametrize(
    ("directive", "status"),
    [("[mock:fail=before_first_chunk]", 500), ("[mock:status=429]", 429)],
    ids=["fail_before_first_chunk", "429"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_responses_failures_before_the_first_event_are_openai_errors(
    mock: MockUpstreamThread, directive: str, status: int, stream: bool
) -> None:
    body = {"model": "m", "input": f"x {directive}", "stream": stream}

    got, raw, _ = raw_post(f"{mock.openai_base_url}/responses", body)

    assert got == status
    assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


def test_responses_fail_mid_stream_non_stream_drops_the_connection(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.responses.create(model="mock-model", input="[mock:fail=mid_stream]")


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_responses_no_usage_omits_usage(mock: MockUpstreamThread, stream: bool) -> None:
    body = {"model": "m", "input": "[mock:tokens=3] [mock:no_usage]", "stream": stream}

    _, raw, _ = raw_post(f"{mock.openai_base_url}/responses", body)

    response = sse_events(raw)[-1][1]["response"] if stream else json.loads(raw)
    assert response["usage"] is None
    assert response["output"][0]["content"][0]["text"] == completion_text(3)


@pytest.mark.parametrize(
    ("directive", "expected"),
    [("[mock:bad_usage]", -4), ("[mock:partial_usage]", None)],
    ids=["bad_usage", "partial_usage"],
)
def test_responses_spoiled_usage_directives_spoil_the_output_count(
    mock: MockUpstreamThread, directive: str, expected: int | None
) -> None:
    body = {"model": "m", "input": f"[mock:tokens=3] {directive}"}

    _, raw, _ = raw_post(f"{mock.openai_base_url}/responses", body)

    assert json.loads(raw)["usage"].get("output_tokens") == expected


def test_responses_delay_is_spent_before_each_delta(oai: openai.OpenAI) -> None:
    started = time.monotonic()
    list(
        oai.responses.create(
            model="mock-model", input="[mock:tokens=4] [mock:delay_ms=50]", stream=True
        )
    )
    assert time.monotonic() - started >= 0.2


# --- OpenAI Embeddings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs",
    ["one text", ["two", "texts here"], [1, 2, 3], [[1, 2], [3, 4, 5]]],
    ids=["string", "strings", "token_array", "token_arrays"],
)
def test_embeddings_bill_exactly_our_count_of_the_input(oai: openai.OpenAI, inputs: Any) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it.
    result = oai.embeddings.create(model="mock-model", input=inputs)

    expected_vectors = 1 if isinstance(inputs, str) or isinstance(inputs[0], int) else len(inputs)
    assert [item.index for item in result.data] == list(range(expected_vectors))
    assert result.data[0].embedding == embedding_vector(0, DEFAULT_EMBEDDING_DIMENSIONS)
    assert result.usage.prompt_tokens == result.usage.total_tokens
    assert result.usage.prompt_tokens == embedding_input_tokens(inputs)


def test_embeddings_float_format_and_dimensions(mock: MockUpstreamThread) -> None:
    body = {"model": "m", "input": "x", "encoding_format": "float", "dimensions": 3}

    status, raw, _ = raw_post(f"{mock.openai_base_url}/embeddings", body)

    assert status == 200
    assert json.loads(raw)["data"][0]["embedding"] == embedding_vector(0, 3)


@pytest.mark.parametrize(
    ("directive", "status"),
    [("[mock:fail=before_first_chunk]", 500), ("[mock:status=429]", 429)],
    ids=["fail_before_first_chunk", "429"],
)
def test_embeddings_failure_directives_are_openai_errors(
    mock: MockUpstreamThread, directive: str, status: int
) -> None:
    got, raw, _ = raw_post(f"{mock.openai_base_url}/embeddings", {"model": "m", "input": directive})

    assert got == status
    assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


def test_embeddings_fail_mid_stream_drops_the_connection(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.embeddings.create(model="mock-model", input="[mock:fail=mid_stream]")


@pytest.mark.parametrize(
    ("directive", "usage"),
    [
        ("[mock:no_usage]", lambda n: None),
        ("[mock:bad_usage]", lambda n: {"prompt_tokens": -1 - n, "total_tokens": n}),
        ("[mock:partial_usage]", lambda n: {"total_tokens": n}),
    ],
    ids=["no_usage", "bad_usage", "partial_usage"],
)
def test_embeddings_usage_directives(
    mock: MockUpstreamThread, directive: str, usage: Callable[[int], dict[str, int] | None]
) -> None:
    text = f"some words {directive}"

    _, raw, _ = raw_post(f"{mock.openai_base_url}/embeddings", {"model": "m", "input": text})

    assert json.loads(raw).get("usage") == usage(embedding_input_tokens(text))


def test_embeddings_bad_directive_is_a_400_naming_input(mock: MockUpstreamThread) -> None:
    status, raw, _ = raw_post(
        f"{mock.openai_base_url}/embeddings", {"model": "m", "input": "[mock:tokens=x]"}
    )

    assert status == 400
    assert json.loads(raw)["error"]["param"] == "input"
