"""Stream bookkeeping: content events are relayed as bytes without parsing, yet usage, errors
and the generated text (for an estimate) come out exactly as if every event were parsed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.upstreams.anthropic import AnthropicMessages
from gateway.upstreams.client import SSESplitter, UpstreamFailure, sse_event
from gateway.upstreams.openai import OpenAIChat


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
