"""Stream bookkeeping: content events are relayed as bytes without parsing, yet usage, errors
and the generated text (for an estimate) come out exactly as if every event were parsed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.upstreams.anthropic import AnthropicMessages
from gateway.upstreams.base import UnreadableUsage, token_count
from gateway.upstreams.client import SSESplitter, UpstreamFailure, sse_event
from gateway.upstreams.openai import OpenAIChat, openai_usage


def _openai_state() -> Any:
    parsed = OpenAIChat.parse(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    return OpenAIChat.stream_state(parsed)


def _delta(text: str, *, usage: str = ', "usage": null') -> bytes:
    choice = json.dumps({"index": 0, "delta": {"content": text}})
    return f'data: {{"object": "chat.completion.chunk", "choices": [{choice}]{usage}}}\n\n'.encode()


def test_openai_content_chunks_relay_unparsed_and_still_count_for_an_estimate() -> None:
    state = _openai_state()
    # Text that mentions the keys is JSON-escaped, so it cannot look like a usage or error key.
    texts = ["Hello", ' the "usage": {} and "error" words', "!"]
    events = [_delta(texts[0]), _delta(texts[1], usage=""), _delta(texts[2], usage=',"usage":null')]

    relayed = [state.feed(event) for event in events]

    assert relayed == events  # byte for byte
    assert len(state.unparsed) == 3 and state.usage is None
    assert state.generated_texts() == texts
    assert state.unparsed == []


@pytest.mark.parametrize("spacing", ["", " ", "\t "])
def test_openai_usage_chunk_is_parsed_and_held_back_whatever_the_spacing(spacing: str) -> None:
    state = _openai_state()
    usage = '{"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}'
    event = f'data: {{"choices": [], "usage":{spacing}{usage}}}\n\n'.encode()

    assert state.feed(_delta("a")) is not None
    assert state.feed(event) is None  # re-sent after the settle, with the cost
    assert state.usage is not None
    assert (state.usage.input_tokens, state.usage.output_tokens) == (7, 3)


def test_openai_error_event_mid_stream_is_a_failure() -> None:
    state = _openai_state()
    with pytest.raises(UpstreamFailure):
        state.feed(b'data: {"error": {"message": "overloaded"}}\n\n')


def test_anthropic_text_deltas_relay_unparsed_and_usage_events_are_read() -> None:
    parsed = AnthropicMessages.parse(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    state = AnthropicMessages.stream_state(parsed)
    start = sse_event(
        {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}},
        "message_start",
    )
    deltas = [
        sse_event(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
            "content_block_delta",
        )
        for t in ("Hel", "lo")
    ]
    end = sse_event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 2},
        },
        "message_delta",
    )

    assert state.feed(start) == start
    assert [state.feed(d) for d in deltas] == deltas
    assert state.feed(end) is None
    assert len(state.unparsed) == 2
    assert state.generated_texts() == ["Hel", "lo"]
    assert state.usage is not None
    assert (state.usage.input_tokens, state.usage.output_tokens) == (9, 2)


@pytest.mark.parametrize("cut", range(1, 30))
def test_sse_splitter_finds_the_same_events_wherever_the_network_cuts_the_bytes(cut: int) -> None:
    wire = (
        b"data: one\r\n\r\n"
        b": keep-alive comment\n\n"
        b"event: message_delta\ndata: two\n\n"
        b"\n"  # a stray blank line
        b"data: three"  # unterminated when the stream ends
    )
    splitter = SSESplitter()
    events = splitter.feed(wire[:cut]) + splitter.feed(wire[cut:]) + splitter.rest()

    assert events == [
        b"data: one\n\n",
        b": keep-alive comment\n\n",
        b"event: message_delta\ndata: two\n\n",
        b"data: three\n\n",
    ]


def test_events_that_arrive_together_are_relayed_in_one_write_up_to_a_failure() -> None:
    from gateway.pipeline import _feed

    state = _openai_state()
    error = b'data: {"error": {"message": "overloaded"}}\n\n'

    out, failure = _feed(state, [_delta("a"), _delta("b"), error, _delta("never")])

    assert out == _delta("a") + _delta("b")  # what came before the failure still goes out
    assert isinstance(failure, UpstreamFailure)
    assert len(state.unparsed) == 2


# --- what an upstream may get wrong: never an exception that leaves a hold unsettled -------


@pytest.mark.parametrize(
    "value", [-1, -0.5, 1.5, "12", True, [3], {"n": 1}, float("inf"), float("nan")]
)
def test_a_token_count_that_is_not_a_non_negative_whole_number_is_unreadable(value: Any) -> None:
    with pytest.raises(UnreadableUsage):
        token_count(value)


def test_a_token_count_may_be_absent_or_a_whole_float() -> None:
    assert (token_count(None), token_count(0), token_count(12), token_count(12.0)) == (0, 0, 12, 12)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 7, "completion_tokens": -3},
        {"prompt_tokens": "7", "completion_tokens": 3},
        {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": "cached"},
        {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "completion_tokens_details": {"reasoning_tokens": -1},
        },
    ],
)
def test_unreadable_openai_usage_counts_as_not_reported(usage: dict[str, Any]) -> None:
    assert openai_usage(usage) is None


def _anthropic_state() -> Any:
    parsed = AnthropicMessages.parse(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    return AnthropicMessages.stream_state(parsed)


def _usage_event(kind: str, usage: dict[str, Any]) -> bytes:
    if kind == "message_start":
        return sse_event({"type": kind, "message": {"usage": usage}}, kind)
    return sse_event({"type": kind, "delta": {}, "usage": usage}, kind)


def test_anthropic_usage_is_the_providers_only_once_message_delta_gives_the_output_count() -> None:
    state = _anthropic_state()
    state.feed(_usage_event("message_start", {"input_tokens": 9, "output_tokens": 1}))
    assert state.reported_usage().estimated  # the output count is a placeholder
    state.feed(_usage_event("message_delta", {"output_tokens": 4}))
    reported = state.reported_usage()
    assert (reported.input_tokens, reported.output_tokens, reported.estimated) == (9, 4, False)


def test_an_unreadable_anthropic_report_keeps_what_was_read_and_leaves_it_estimated() -> None:
    state = _anthropic_state()
    state.feed(_usage_event("message_start", {"input_tokens": 9, "output_tokens": 1}))
    state.feed(_usage_event("message_delta", {"output_tokens": -4}))
    reported = state.reported_usage()
    assert (reported.input_tokens, reported.output_tokens, reported.estimated) == (9, 1, True)
    # A later readable report cannot clear the doubt: the pipeline still counts for itself.
    state.feed(_usage_event("message_delta", {"output_tokens": 4}))
    assert state.reported_usage().estimated


@pytest.mark.parametrize(
    ("body_usage", "estimated"),
    [
        ({"input_tokens": 9, "output_tokens": 4}, False),
        ({"input_tokens": 9}, True),
        ({"output_tokens": 4}, True),
    ],
)
def test_an_anthropic_report_without_its_main_counts_is_marked_estimated(
    body_usage: dict[str, Any], estimated: bool
) -> None:
    usage = AnthropicMessages.usage_from_body({"usage": body_usage})
    assert usage is not None and usage.estimated is estimated


@pytest.mark.parametrize(
    ("usage", "estimated"),
    [
        ({"prompt_tokens": 9, "completion_tokens": 4}, False),
        ({"prompt_tokens": 9}, True),
        ({"completion_tokens": 4}, True),
    ],
)
def test_an_openai_report_without_its_main_counts_is_marked_estimated(
    usage: dict[str, Any], estimated: bool
) -> None:
    read = openai_usage(usage)
    assert read is not None and read.estimated is estimated


def test_an_unreadable_anthropic_body_report_counts_as_not_reported() -> None:
    assert AnthropicMessages.usage_from_body({"usage": {"input_tokens": "9"}}) is None


def test_openai_events_that_are_not_objects_fail_as_protocol_errors_and_estimates_skip_them() -> (
    None
):
    state = _openai_state()
    with pytest.raises(ValueError, match="not a JSON object"):
        state.feed(b'data: [{"usage": {"prompt_tokens": 1}}]\n\n')
    # Relayed unparsed, then found not to parse when an estimate needs the text.
    for event in (_delta("one"), b"data: {not json\n\n", b"data: []\n\n", _delta("two")):
        state.feed(event)
    malformed = b'data: {"choices": [7, {"delta": "x"}, {"delta": {"content": 5}}]}\n\n'
    state.feed(malformed)
    assert state.generated_texts() == ["one", "two"]


def test_anthropic_malformed_parts_count_as_no_text() -> None:
    parsed = AnthropicMessages.parse(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    state = AnthropicMessages.stream_state(parsed)
    for delta in ({"text": 5}, "text", {"text": "ok"}):
        state.feed(
            sse_event({"type": "content_block_delta", "delta": delta}, "content_block_delta")
        )
    assert state.generated_texts() == ["ok"]
    body = {"content": [{"type": "text", "text": 3}, {"type": "text", "text": "fine"}, "x"]}
    assert AnthropicMessages.texts_from_body(body) == ["fine"]
    assert AnthropicMessages.texts_from_body({"content": "not a list"}) == []
