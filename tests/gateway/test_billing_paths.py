"""Every pipeline path, through the official SDKs and a real uvicorn, asserted on the ledger."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from billing.models import Hold, LedgerTransaction, UsageRecord
from billing.pricing import Usage
from gateway.mock.server import completion_text
from gateway.tokens import messages_tokens, text_tokens
from tests.gateway.ledger import (
    assert_clean,
    balance,
    charged,
    expected_cost,
    usage_record,
    wait_for_hold_resolution,
)

START = Decimal("10")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def mock_prompt_tokens(messages, system=None) -> int:  # type: ignore[no-untyped-def]
    return messages_tokens(messages, system=system)


# --- exact cost, normal end ---------------------------------------------------------------


def test_openai_non_stream_charges_tariff_times_usage(world):
    messages = user("Say hello [mock:tokens=7]")
    raw = world.openai().chat.completions.with_raw_response.create(
        model=world.openai_model, messages=messages
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    usage = Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=7)
    cost = expected_cost(usage)
    assert completion.usage.prompt_tokens == usage.input_tokens
    assert completion.usage.completion_tokens == 7
    assert Decimal(completion.usage.model_extra["cost"]) == cost
    assert Decimal(raw.headers["x-request-cost"]) == cost
    assert charged(request_id) == cost
    assert balance(world.account) == (START - cost, 0)
    assert usage_record(request_id).estimated is False
    assert_clean(world.account)


def test_a_prompt_too_long_to_count_on_the_event_loop_is_held_and_charged_alike(world):
    """Bodies over LOOP_PROMPT_MAX_BYTES have their hold placed in a hold thread; the first,
    small request warms the route cache, so its hold is placed from the event loop."""
    from gateway.pipeline import LOOP_PROMPT_MAX_BYTES

    small = user("short [mock:tokens=3]")
    long = user("word " * (LOOP_PROMPT_MAX_BYTES // 5 + 100) + "[mock:tokens=3]")
    spent = Decimal(0)
    for messages in (small, long):
        raw = world.openai().chat.completions.with_raw_response.create(
            model=world.openai_model, messages=messages
        )
        request_id = raw.headers["x-request-id"]
        cost = expected_cost(Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=3))
        hold = Hold.objects.get(request_id=request_id)
        assert hold.state == Hold.State.SETTLED and hold.amount >= cost
        assert charged(request_id) == cost
        spent += cost
    assert balance(world.account) == (START - spent, 0)
    assert_clean(world.account)


@pytest.mark.parametrize("include_usage", [True, False], ids=["include_usage", "no_include_usage"])
def test_openai_stream_charges_exactly_with_and_without_usage_chunk(world, include_usage):
    messages = user("Count [mock:tokens=12]")
    options = {"include_usage": True} if include_usage else None
    raw = world.openai().chat.completions.with_raw_response.create(
        model=world.openai_model, messages=messages, stream=True, stream_options=options
    )
    request_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage_chunks = [c for c in chunks if c.usage is not None]
    cost = expected_cost(Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=12))
    assert text == completion_text(12)
    if include_usage:
        assert len(usage_chunks) == 1
        assert usage_chunks[0].usage.completion_tokens == 12
        assert Decimal(usage_chunks[0].usage.model_extra["cost"]) == cost
    else:
        assert usage_chunks == [], "the usage chunk must be stripped when not asked for"
    # The stream's end was sent after the settle committed: no waiting needed.
    assert charged(request_id) == cost
    assert balance(world.account) == (START - cost, 0)
    assert_clean(world.account)


def test_anthropic_non_stream_charges_tariff_times_usage(world):
    messages = user("Hello [mock:tokens=9]")
    raw = world.anthropic().messages.with_raw_response.create(
        model=world.anthropic_model, max_tokens=100, messages=messages
    )
    message = raw.parse()
    request_id = raw.headers["x-request-id"]
    cost = expected_cost(Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=9))
    assert message.usage.output_tokens == 9
    assert Decimal(raw.headers["x-request-cost"]) == cost
    assert Decimal(message.usage.model_extra["cost"]) == cost
    assert charged(request_id) == cost
    assert balance(world.account) == (START - cost, 0)
    assert_clean(world.account)


def test_anthropic_stream_reports_cost_in_message_delta_and_charges_exactly(world):
    messages = user("Hello [mock:tokens=6]")
    with world.anthropic().messages.stream(
        model=world.anthropic_model, max_tokens=100, messages=messages
    ) as stream:
        request_id = stream.response.headers["x-request-id"]
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e for e in events if e.type == "message_delta"]
    cost = expected_cost(Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=6))
    assert final.usage.output_tokens == 6
    assert len(deltas) == 1 and Decimal(deltas[0].usage.model_extra["cost"]) == cost
    assert events[-1].type == "message_stop"
    assert charged(request_id) == cost
    assert balance(world.account) == (START - cost, 0)
    assert_clean(world.account)


def test_token_classes_are_priced_separately(world):
    """OpenAI counts cached tokens inside prompt_tokens and reasoning inside completion."""
    messages = user("Think [mock:tokens=10] [mock:cached_tokens=5] [mock:reasoning_tokens=4]")
    raw = world.openai().chat.completions.with_raw_response.create(
        model=world.openai_model, messages=messages
    )
    prompt = mock_prompt_tokens(messages)
    # 10 visible tokens plus 4 reasoning tokens, all inside completion_tokens.
    usage = Usage(
        input_tokens=prompt - 5, cached_input_tokens=5, output_tokens=14, reasoning_tokens=4
    )
    assert charged(raw.headers["x-request-id"]) == expected_cost(usage)
    record = usage_record(raw.headers["x-request-id"])
    assert (record.cached_input_tokens, record.reasoning_tokens) == (5, 4)


def test_anthropic_cache_tokens_are_reported_beside_input(world):
    messages = user("Cache [mock:tokens=3] [mock:cached_tokens=20] [mock:cache_write_tokens=8]")
    with world.anthropic().messages.stream(
        model=world.anthropic_model, max_tokens=50, messages=messages
    ) as stream:
        request_id = stream.response.headers["x-request-id"]
        stream.until_done()
    # Anthropic's input_tokens excludes cache reads and writes; the three add up to the prompt.
    usage = Usage(
        input_tokens=mock_prompt_tokens(messages) - 28,
        cached_input_tokens=20,
        cache_write_tokens=8,
        output_tokens=3,
    )
    assert charged(request_id) == expected_cost(usage)


# --- failures before the first byte: full release, on both endpoints -----------------------


@pytest.mark.parametrize(
    ("directive", "status"),
    [
        ("[mock:fail=before_first_chunk]", 502),
        ("[mock:status=503]", 502),
        ("[mock:status=429]", 429),
        ("[mock:status=400]", 400),
    ],
    ids=["fail_before_first_chunk", "upstream_503", "upstream_429", "upstream_400"],
)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non_stream"])
def test_openai_upstream_failure_before_first_byte_releases_hold(world, directive, status, stream):
    with world.http() as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": world.openai_model,
                "stream": stream,
                "messages": user(f"x {directive}"),
            },
        )
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    hold = Hold.objects.get(request_id=response.headers["x-request-id"])
    assert hold.state == Hold.State.RELEASED
    assert charged(hold.request_id) == 0
    assert balance(world.account) == (START, 0)
    assert_clean(world.account)


@pytest.mark.parametrize(
    ("directive", "status"),
    [
        ("[mock:fail=before_first_chunk]", 502),
        ("[mock:status=500]", 502),
        ("[mock:status=429]", 429),
    ],
    ids=["fail_before_first_chunk", "upstream_500", "upstream_429"],
)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non_stream"])
def test_anthropic_upstream_failure_before_first_byte_releases_hold(
    world, directive, status, stream
):
    with world.http() as client:
        response = client.post(
            "/v1/messages",
            json={
                "model": world.anthropic_model,
                "max_tokens": 50,
                "stream": stream,
                "messages": user(f"x {directive}"),
            },
        )
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error" and "message" in body["error"]
    hold = Hold.objects.get(request_id=response.headers["x-request-id"])
    assert hold.state == Hold.State.RELEASED
    assert balance(world.account) == (START, 0)
    assert_clean(world.account)


def test_sdk_sees_provider_errors_for_upstream_failure(world):
    with pytest.raises(openai.InternalServerError) as excinfo:
        world.openai().chat.completions.create(
            model=world.openai_model, messages=user("[mock:fail=before_first_chunk]"), stream=True
        )
    assert excinfo.value.status_code == 502
    with pytest.raises(anthropic.RateLimitError):
        world.anthropic().messages.create(
            model=world.anthropic_model, max_tokens=10, messages=user("[mock:status=429]")
        )
    assert balance(world.account) == (START, 0)


# --- failures mid-stream and disconnects: partial, estimated billing -------------------------


def _sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


def test_openai_mid_stream_failure_bills_generated_part_and_sends_error_event(world):
    messages = user("Go [mock:tokens=10] [mock:delay_ms=5] [mock:fail=mid_stream]")
    with (
        world.http() as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": world.openai_model,
                "stream": True,
                "messages": messages,
            },
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        lines = _sse_lines(response)
    payloads = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    generated = "".join(
        (p["choices"][0]["delta"].get("content") or "") for p in payloads if p.get("choices")
    )
    assert "error" in payloads[-1]
    assert "data: [DONE]" not in lines
    record = usage_record(request_id)
    assert record.estimated is True
    assert record.output_tokens == text_tokens(generated) > 0
    cost = expected_cost(
        Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=text_tokens(generated))
    )
    assert charged(request_id) == cost > 0
    assert Hold.objects.get(request_id=request_id).state == Hold.State.SETTLED
    assert_clean(world.account)


def test_anthropic_mid_stream_failure_bills_reported_input_and_generated_output(world):
    messages = user("Go [mock:tokens=10] [mock:delay_ms=5] [mock:fail=mid_stream]")
    with (
        world.http() as client,
        client.stream(
            "POST",
            "/v1/messages",
            json={
                "model": world.anthropic_model,
                "max_tokens": 100,
                "stream": True,
                "messages": messages,
            },
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        lines = _sse_lines(response)
    assert "event: error" in lines
    assert "event: message_stop" not in lines
    generated = "".join(
        json.loads(line[6:])["delta"]["text"]
        for line in lines
        if line.startswith("data: ") and '"text_delta"' in line
    )
    record = usage_record(request_id)
    assert record.estimated is True
    assert record.input_tokens == mock_prompt_tokens(messages)  # reported by message_start
    assert charged(request_id) == expected_cost(
        Usage(
            input_tokens=mock_prompt_tokens(messages), output_tokens=max(1, text_tokens(generated))
        )
    )
    assert_clean(world.account)


@pytest.mark.parametrize("endpoint", ["openai", "anthropic"])
def test_client_disconnect_bills_what_was_generated(world, endpoint):
    messages = user("Slow [mock:tokens=40] [mock:delay_ms=50]")
    if endpoint == "openai":
        path, body = (
            "/v1/chat/completions",
            {"model": world.openai_model, "stream": True, "messages": messages},
        )
    else:
        path, body = (
            "/v1/messages",
            {
                "model": world.anthropic_model,
                "max_tokens": 100,
                "stream": True,
                "messages": messages,
            },
        )
    with world.http() as client, client.stream("POST", path, json=body) as response:
        request_id = response.headers["x-request-id"]
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data:")
            if seen >= 6:
                break  # leaving the block closes the connection mid-stream
    hold = wait_for_hold_resolution(request_id)
    full = expected_cost(Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=40))
    paid = charged(request_id)
    assert hold.state == Hold.State.SETTLED
    assert 0 < paid < full, "a disconnect is billed for what was generated, never free"
    assert usage_record(request_id).outcome == "client_disconnected"
    assert_clean(world.account)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non_stream"])
def test_missing_upstream_usage_is_estimated_and_marked(world, stream):
    messages = user("Quiet [mock:tokens=8] [mock:no_usage]")
    with world.http() as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": world.openai_model,
                "stream": stream,
                "messages": messages,
                "stream_options": {"include_usage": True} if stream else None,
            },
        )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    record = usage_record(request_id)
    # Our tokenizer is the mock's, so the estimate is exact here; it is still flagged.
    expected = expected_cost(Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=8))
    assert record.estimated is True
    assert charged(request_id) == expected
    assert_clean(world.account)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non_stream"])
@pytest.mark.parametrize("endpoint", ["openai", "anthropic"])
@pytest.mark.parametrize("report", ["bad_usage", "partial_usage"])
def test_usage_without_a_readable_output_count_is_never_billed_as_reported(
    world, endpoint, stream, report
):
    # Taken as reported, a negative output count would charge less than nothing, and a
    # missing one (or Anthropic's message_start placeholder) would bill the answer as free.
    messages = user(f"Odd [mock:tokens=9] [mock:{report}]")
    if endpoint == "openai":
        path = "/v1/chat/completions"
        body = {"model": world.openai_model, "messages": messages}
        if stream:
            body["stream_options"] = {"include_usage": True}
    else:
        path = "/v1/messages"
        body = {"model": world.anthropic_model, "messages": messages, "max_tokens": 64}
    with world.http() as client:
        response = client.post(path, json={**body, "stream": stream})
        text = response.text
    assert response.status_code == 200, text
    request_id = response.headers["x-request-id"]
    # Billed from our own count (the mock's tokenizer is ours, so exact here), flagged.
    expected = expected_cost(Usage(input_tokens=mock_prompt_tokens(messages), output_tokens=9))
    assert charged(request_id) == expected
    assert usage_record(request_id).estimated is True
    assert '"estimated":true' in text.replace(" ", "")
    assert balance(world.account) == (START - expected, 0)
    assert_clean(world.account)


def test_every_response_carries_a_request_id(world):
    with world.http() as client:
        ok = client.get("/v1/billing/balance")
        unauthorized = client.get("/v1/billing/balance", headers={"Authorization": "Bearer nope"})
        missing = client.get("/v1/nowhere")
    for response in (ok, unauthorized, missing):
        assert response.headers["x-request-id"].startswith("req_")
    assert missing.status_code == 404 and "error" in missing.json()


def test_usage_record_keeps_timings_and_outcome(world):
    raw = world.openai().chat.completions.with_raw_response.create(
        model=world.openai_model, messages=user("t [mock:tokens=3]"), stream=True
    )
    list(raw.parse())
    record = UsageRecord.objects.get(request_id=raw.headers["x-request-id"])
    assert record.outcome == "completed" and record.stream is True
    assert record.first_byte_ms is not None and record.duration_ms is not None
    assert record.duration_ms >= record.first_byte_ms
    assert (
        LedgerTransaction.objects.get(request_id=record.request_id).model_alias
        == world.openai_model
    )


def test_slow_stream_settles_before_the_final_bytes(world):
    """A client that has read the end of the stream already sees its balance updated."""
    start = time.monotonic()
    raw = world.openai().chat.completions.with_raw_response.create(
        model=world.openai_model,
        messages=user("s [mock:tokens=5] [mock:delay_ms=20]"),
        stream=True,
        stream_options={"include_usage": True},
    )
    list(raw.parse())
    assert time.monotonic() - start >= 0.1
    with world.http() as client:
        after = client.get("/v1/billing/balance").json()
    assert Decimal(after["held"]) == 0
    assert Decimal(after["balance"]) == START - charged(raw.headers["x-request-id"])


def test_upstream_timeout_before_first_byte_gets_504_and_releases_the_hold(world):
    from gateway.models import Upstream

    Upstream.objects.filter(name="mock-openai").update(read_timeout_seconds=1)
    with world.http() as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": world.openai_model,
                "messages": user("slow [mock:tokens=2] [mock:delay_ms=2500]"),
            },
        )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    hold = Hold.objects.get(request_id=response.headers["x-request-id"])
    assert hold.state == Hold.State.RELEASED
    assert balance(world.account) == (START, 0)


def test_stream_that_stalls_after_its_first_event_is_billed_and_ends_with_an_error(world):
    from gateway.models import Upstream

    Upstream.objects.filter(name="mock-openai").update(read_timeout_seconds=1)
    messages = user("stall [mock:tokens=2] [mock:delay_ms=2500]")
    with (
        world.http() as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": world.openai_model,
                "stream": True,
                "messages": messages,
            },
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        lines = _sse_lines(response)
    assert response.status_code == 200  # the role chunk had already been relayed
    assert "error" in json.loads(lines[-1][6:])
    record = usage_record(request_id)
    assert (record.estimated, record.output_tokens, record.outcome) == (True, 0, "upstream_timeout")
    assert charged(request_id) == expected_cost(Usage(input_tokens=mock_prompt_tokens(messages)))
    assert_clean(world.account)
