"""A mock LLM upstream speaking the OpenAI Chat Completions, Responses and Embeddings and the
Anthropic Messages wire formats.

Output is deterministic and usage is exact, so tests and benchmarks can check billing to the
last token. OpenAI base URL: <root>/v1 (POST /v1/chat/completions, /v1/responses,
/v1/embeddings, GET /v1/models); Anthropic base URL: <root> (POST /v1/messages). Any API key is
accepted.

Responses: the same plan as a chat choice, capped by ``max_output_tokens`` (then status
"incomplete" and the stream ends with response.incomplete); the prompt is
``gateway.tokens.responses_input_tokens(input, instructions=...)``; directives come from a
string input or the last user item; a stream is OpenAI's typed events, one output_text.delta
per token, and [mock:fail=mid_stream] ends it with an ``error`` event after half the tokens.
Embeddings: prompt_tokens = ``gateway.tokens.embedding_input_tokens(input)``; directives come
from every string input; [mock:tokens] and the token classes do not apply; float or base64.

Token rules (per choice):
- The completion is ``completion_text(k)``: words from COMPLETION_WORDS in order, each exactly
  one cl100k token, and any run of them is exactly one token per word. One token per chunk.
- k = ``[mock:tokens=N]`` (default DEFAULT_COMPLETION_TOKENS), capped by ``max_tokens`` /
  ``max_completion_tokens`` (finish_reason "length" / stop_reason "max_tokens" when capped).
  Both at once (neither null) is OpenAI's 400, so a request that reaches the mock carried
  one limit at most.
- Prompt tokens = ``gateway.tokens.messages_tokens(messages, system=...)`` without margin.
- OpenAI usage: completion_tokens = n * (k + reasoning); prompt_tokens includes cached.
  Anthropic usage: input_tokens + cache_read_input_tokens + cache_creation_input_tokens = prompt.

Directives, read from the last user message and combinable (a malformed one is a 400):
  [mock:tokens=N]            completion length per choice
  [mock:delay_ms=D]          sleep before each content chunk (non-stream: D * chunks in total)
  [mock:fail=before_first_chunk]  500 with a provider error body, nothing streamed
  [mock:fail=mid_stream]     stream: max(1, k // 2) tokens per choice, then the TCP connection
                             is aborted; non-stream: connection aborted, no response
  [mock:status=NNN]          that status (>= 400) with a provider error body
  [mock:no_usage]            no usage anywhere (no usage chunk, no usage object or fields)
  [mock:bad_usage]           usage reported, but its output count is negative (OpenAI
                             completion_tokens; Anthropic output_tokens in the body or the
                             message_delta): a count a reader must not trust
  [mock:partial_usage]       usage reported without its output count (the same fields left
                             out; Anthropic's message_start keeps its placeholder)
  [mock:cached_tokens=N]     cache-read prompt tokens (capped at the prompt)
  [mock:cache_write_tokens=N]  Anthropic cache_creation_input_tokens (capped at the rest)
  [mock:reasoning_tokens=N]  OpenAI hidden reasoning tokens, spent from max tokens first

Kept free of Django's ORM and settings so it is cheap per request and importable anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.tokens import embedding_input_tokens, messages_tokens, responses_input_tokens

# Every word is one cl100k token, and a run of them tokenizes to one token per word (the
# pre-tokenizer splits on the leading space), so text_tokens(completion_text(k)) == k.
COMPLETION_WORDS: tuple[str, ...] = (
    " the",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " a",
    " lazy",
    " dog",
    " and",
    " then",
    " runs",
    " back",
    " home",
    " to",
    " rest",
)
DEFAULT_COMPLETION_TOKENS = 16
MODELS = ("mock-model",)
MAX_CHOICES = 128

FAIL_BEFORE_FIRST_CHUNK = "before_first_chunk"
FAIL_MID_STREAM = "mid_stream"

BOTH_LIMITS_MESSAGE = (
    "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported."
)

_DIRECTIVE = re.compile(r"\[mock:([a-z_]+)(?:=([^\]]*))?\]")
_INT_DIRECTIVES = ("tokens", "delay_ms", "cached_tokens", "reasoning_tokens", "cache_write_tokens")
_ids = itertools.count(1)
_JSON_SEPARATORS = (",", ":")


def completion_token(index: int) -> str:
    return COMPLETION_WORDS[index % len(COMPLETION_WORDS)]


def completion_text(tokens: int) -> str:
    """The exact text of one choice that is `tokens` tokens long."""
    return "".join(completion_token(i) for i in range(tokens))


class DirectiveError(ValueError):
    pass


@dataclass(frozen=True)
class Directives:
    tokens: int | None = None
    delay_ms: int = 0
    fail: str | None = None
    status: int | None = None
    no_usage: bool = False
    bad_usage: bool = False
    partial_usage: bool = False
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0


def directives_parse(text: str) -> Directives:
    """Directives found in `text`; a malformed one raises DirectiveError (a typo must not pass)."""
    values: dict[str, Any] = {}
    for name, raw in _DIRECTIVE.findall(text):
        value = raw.strip()
        if name in _INT_DIRECTIVES:
            if not value.isdigit():
                raise DirectiveError(f"[mock:{name}] needs a non-negative integer, got {raw!r}")
            values[name] = int(value)
        elif name == "status":
            if not value.isdigit() or not 100 <= int(value) <= 599:
                raise DirectiveError(f"[mock:status] needs an HTTP status, got {raw!r}")
            values[name] = int(value)
        elif name == "fail":
            if value not in (FAIL_BEFORE_FIRST_CHUNK, FAIL_MID_STREAM):
                raise DirectiveError(
                    f"[mock:fail] must be before_first_chunk or mid_stream: {raw!r}"
                )
            values[name] = value
        elif name in ("no_usage", "bad_usage", "partial_usage"):
            values[name] = True
        else:
            raise DirectiveError(f"unknown directive [mock:{name}]")
    return Directives(**values)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


@dataclass(frozen=True)
class Plan:
    """What one request generates. Token counts are per choice unless named otherwise."""

    prompt_tokens: int
    requested_tokens: int
    visible_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    choices: int

    @property
    def truncated(self) -> bool:
        return self.visible_tokens < self.requested_tokens

    @property
    def completion_tokens(self) -> int:
        return (self.visible_tokens + self.reasoning_tokens) * self.choices

    @property
    def mid_stream_tokens(self) -> int:
        """Tokens per choice sent before a mid-stream failure: half, at least one."""
        return min(self.visible_tokens, max(1, self.visible_tokens // 2))


def plan_make(
    *, directives: Directives, prompt_tokens: int, max_tokens: int | None, choices: int
) -> Plan:
    requested = DEFAULT_COMPLETION_TOKENS if directives.tokens is None else directives.tokens
    budget = requested + directives.reasoning_tokens if max_tokens is None else max_tokens
    # Like OpenAI's reasoning models, hidden reasoning spends the output budget first.
    reasoning = min(directives.reasoning_tokens, budget)
    visible = min(requested, budget - reasoning)
    # Cached and cache-written tokens are parts of the prompt, never more than it.
    cached = min(directives.cached_tokens, prompt_tokens)
    cache_write = min(directives.cache_write_tokens, prompt_tokens - cached)
    return Plan(
        prompt_tokens=prompt_tokens,
        requested_tokens=requested,
        visible_tokens=visible,
        reasoning_tokens=reasoning,
        cached_tokens=cached,
        cache_write_tokens=cache_write,
        choices=choices,
    )


class BadRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=_JSON_SEPARATORS).encode()


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name} must be a positive integer", param=name)
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty array", param="messages")
    if not all(isinstance(message, dict) for message in messages):
        raise BadRequest("each message must be an object", param="messages")
    return messages


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string", param="model")
    return model


def _abort(request: web.Request) -> None:
    """Drop the TCP connection mid-response, as a crashed upstream or a cut network would."""
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _sleep_ms(delay_ms: int) -> None:
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)


class _ConnectionDropped(Exception):
    """Raised after _abort so the handler ends without aiohttp writing to the dead transport."""


@web.middleware
async def _dropped_connection_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ConnectionDropped:
        # The transport is gone; cancelling is how aiohttp ends a handler whose peer vanished.
        raise asyncio.CancelledError from None


async def _whole_answer_wait(request: web.Request, directives: Directives, *, chunks: int) -> None:
    """A non-streamed answer's delay ([mock:delay_ms] per chunk it would have streamed), and
    [mock:fail=mid_stream]: the connection dropped instead of an answer."""
    await _sleep_ms(directives.delay_ms * chunks)
    if directives.fail == FAIL_MID_STREAM:
        _abort(request)
        raise _ConnectionDropped


# --- OpenAI Chat Completions -----------------------------------------------------------------

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
}


def openai_error(status: int, message: str, *, param: str | None = None) -> web.Response:
    error_type, code = _OPENAI_ERRORS.get(
        status, ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    )
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.Response(status=status, body=_dumps(body), content_type="application/json")


def openai_directives(text: str, *, param: str) -> Directives:
    try:
        return directives_parse(text)
    except DirectiveError as exc:
        raise BadRequest(str(exc), param=param) from exc


def openai_failure_as_directed(directives: Directives) -> web.Response | None:
    """The error answer [mock:status=NNN] or [mock:fail=before_first_chunk] asks for."""
    if directives.status is not None and directives.status >= 400:
        return openai_error(directives.status, f"mock upstream status {directives.status}")
    if directives.fail == FAIL_BEFORE_FIRST_CHUNK:
        return openai_error(500, "mock upstream failed before the first chunk")
    return None


def usage_as_directed(
    usage: dict[str, Any], directives: Directives, *, output_key: str
) -> dict[str, Any]:
    """[mock:bad_usage] and [mock:partial_usage] spoil the final report's output count."""
    if directives.bad_usage:
        return {**usage, output_key: -1 - usage[output_key]}
    if directives.partial_usage:
        return {key: value for key, value in usage.items() if key != output_key}
    return usage


def openai_usage(plan: Plan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        # OpenAI counts cached tokens inside prompt_tokens and reasoning inside completion_tokens.
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning_tokens * plan.choices,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


async def openai_chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await _json_object(request)
        model = _model(body)
        messages = _messages(body)
        choices = _positive_int(body, "n") or 1
        if choices > MAX_CHOICES:
            raise BadRequest(f"n must be at most {MAX_CHOICES}", param="n")
        max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(
            body, "max_tokens"
        )
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            # As OpenAI answers (code invalid_parameter_combination): one limit, never two.
            raise BadRequest(BOTH_LIMITS_MESSAGE, param="max_tokens")
        stream = body.get("stream") is True
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise BadRequest("stream_options must be an object", param="stream_options")
        directives = openai_directives(last_user_text(messages), param="messages")
    except BadRequest as exc:
        return openai_error(400, exc.message, param=exc.param)
    if (failure := openai_failure_as_directed(directives)) is not None:
        return failure

    plan = plan_make(
        directives=directives,
        prompt_tokens=messages_tokens(messages),
        max_tokens=max_tokens,
        choices=choices,
    )
    completion_id = f"chatcmpl-mock{next(_ids)}"
    created = int(time.time())
    finish_reason = "length" if plan.truncated else "stop"
    headers = {"x-request-id": completion_id}

    if not stream:
        await _whole_answer_wait(request, directives, chunks=plan.visible_tokens * plan.choices)
        text = completion_text(plan.visible_tokens)
        response: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                for index in range(plan.choices)
            ],
        }
        if not directives.no_usage:
            response["usage"] = usage_as_directed(
                openai_usage(plan), directives, output_key="completion_tokens"
            )
        return web.Response(body=_dumps(response), content_type="application/json", headers=headers)

    include_usage = stream_options.get("include_usage") is True
    sse = web.StreamResponse(
        headers={
            **headers,
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
        }
    )
    await sse.prepare(request)
    # The chunk envelope is shared; only "choices" (and the final "usage") change per chunk.
    head = (
        b'data: {"id":'
        + _dumps(completion_id)
        + b',"object":"chat.completion.chunk","created":'
        + str(created).encode()
        + b',"model":'
        + _dumps(model)
        + b',"system_fingerprint":"fp_mock","choices":'
    )
    # With include_usage OpenAI sends "usage": null on every chunk but the usage chunk.
    tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    async def send(choice: dict[str, Any]) -> None:
        await sse.write(head + b"[" + _dumps(choice) + b"]" + tail)

    for index in range(plan.choices):
        delta = {"role": "assistant", "content": "", "refusal": None}
        await send({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
    tokens_to_send = (
        plan.mid_stream_tokens if directives.fail == FAIL_MID_STREAM else plan.visible_tokens
    )
    for position in range(tokens_to_send):
        token = completion_token(position)
        for index in range(plan.choices):
            await _sleep_ms(directives.delay_ms)
            delta = {"content": token}
            await send({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
    if directives.fail == FAIL_MID_STREAM:
        _abort(request)
        raise _ConnectionDropped
    for index in range(plan.choices):
        await send({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason})
    if include_usage and not directives.no_usage:
        usage = usage_as_directed(openai_usage(plan), directives, output_key="completion_tokens")
        await sse.write(head + b'[],"usage":' + _dumps(usage) + b"}\n\n")
    await sse.write(b"data: [DONE]\n\n")
    await sse.write_eof()
    return sse


async def openai_models(request: web.Request) -> web.Response:
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "mock"} for name in MODELS]
    return web.Response(
        body=_dumps({"object": "list", "data": data}), content_type="application/json"
    )


# --- Anthropic Messages ----------------------------------------------------------------------

_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> web.Response:
    error_type = _ANTHROPIC_ERRORS.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return web.Response(status=status, body=_dumps(body), content_type="application/json")


def anthropic_usage(plan: Plan, *, output_tokens: int) -> dict[str, Any]:
    # Anthropic reports cache reads and writes beside input_tokens: the three add up to the prompt.
    return {
        "input_tokens": plan.prompt_tokens - plan.cached_tokens - plan.cache_write_tokens,
        "cache_creation_input_tokens": plan.cache_write_tokens,
        "cache_read_input_tokens": plan.cached_tokens,
        "output_tokens": output_tokens,
    }


def _sse_event(event_type: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + _dumps(payload) + b"\n\n"


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    try:
        body = await _json_object(request)
        model = _model(body)
        messages = _messages(body)
        max_tokens = _positive_int(body, "max_tokens")
        if max_tokens is None:
            raise BadRequest("max_tokens: Field required", param="max_tokens")
        system = body.get("system")
        stream = body.get("stream") is True
        try:
            directives = directives_parse(last_user_text(messages))
        except DirectiveError as exc:
            raise BadRequest(str(exc)) from exc
    except BadRequest as exc:
        return anthropic_error(400, exc.message)

    if directives.status is not None and directives.status >= 400:
        return anthropic_error(directives.status, f"mock upstream status {directives.status}")
    if directives.fail == FAIL_BEFORE_FIRST_CHUNK:
        return anthropic_error(500, "mock upstream failed before the first chunk")

    plan = plan_make(
        directives=directives,
        prompt_tokens=messages_tokens(messages, system=system),
        max_tokens=max_tokens,
        choices=1,
    )
    message_id = f"msg_mock{next(_ids)}"
    stop_reason = "max_tokens" if plan.truncated else "end_turn"
    headers = {"request-id": f"req_mock{message_id[8:]}"}

    if not stream:
        await _whole_answer_wait(request, directives, chunks=plan.visible_tokens)
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": completion_text(plan.visible_tokens)}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if not directives.no_usage:
            message["usage"] = usage_as_directed(
                anthropic_usage(plan, output_tokens=plan.visible_tokens),
                directives,
                output_key="output_tokens",
            )
        return web.Response(body=_dumps(message), content_type="application/json", headers=headers)

    sse = web.StreamResponse(
        headers={
            **headers,
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
        }
    )
    await sse.prepare(request)
    start_message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if not directives.no_usage:
        start_message["usage"] = anthropic_usage(plan, output_tokens=min(1, plan.visible_tokens))
    await sse.write(
        _sse_event("message_start", {"type": "message_start", "message": start_message})
    )
    await sse.write(
        _sse_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
    )
    await sse.write(_sse_event("ping", {"type": "ping"}))
    tokens_to_send = (
        plan.mid_stream_tokens if directives.fail == FAIL_MID_STREAM else plan.visible_tokens
    )
    for position in range(tokens_to_send):
        await _sleep_ms(directives.delay_ms)
        delta = {"type": "text_delta", "text": completion_token(position)}
        await sse.write(
            _sse_event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        )
    if directives.fail == FAIL_MID_STREAM:
        _abort(request)
        raise _ConnectionDropped
    await sse.write(_sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    message_delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
    }
    if not directives.no_usage:
        # Cumulative, like Anthropic's: a reader must replace earlier numbers, not add to them.
        message_delta["usage"] = usage_as_directed(
            anthropic_usage(plan, output_tokens=plan.visible_tokens),
            directives,
            output_key="output_tokens",
        )
    await sse.write(_sse_event("message_delta", message_delta))
    await sse.write(_sse_event("message_stop", {"type": "message_stop"}))
    await sse.write_eof()
    return sse


# --- OpenAI Responses ------------------------------------------------------------------------


def responses_usage(plan: Plan) -> dict[str, Any]:
    output = plan.visible_tokens + plan.reasoning_tokens
    return {
        # As in Chat Completions, cached tokens are inside input_tokens and reasoning inside
        # output_tokens.
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        "total_tokens": plan.prompt_tokens + output,
    }


def _responses_input(body: dict[str, Any]) -> str | list[Any]:
    value = body.get("input")
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return value
    raise BadRequest("input must be a non-empty string or array of items", param="input")


def _message_item(item_id: str, text: str, *, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content if status == "completed" else [],
    }


def _reasoning_item(item_id: str) -> dict[str, Any]:
    # OpenAI shows hidden reasoning as an item with no text (unless a summary was asked for).
    return {"id": item_id, "type": "reasoning", "summary": []}


def _response_object(
    body: dict[str, Any],
    *,
    response_id: str,
    created: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


async def openai_responses(request: web.Request) -> web.StreamResponse:
    """The Responses API: a reasoning item (with [mock:reasoning_tokens]) and one message."""
    try:
        body = await _json_object(request)
        model = _model(body)
        items = _responses_input(body)
        max_tokens = _positive_int(body, "max_output_tokens")
        instructions = body.get("instructions")
        stream = body.get("stream") is True
        directives = openai_directives(
            items if isinstance(items, str) else last_user_text(items), param="input"
        )
    except BadRequest as exc:
        return openai_error(400, exc.message, param=exc.param)
    if (failure := openai_failure_as_directed(directives)) is not None:
        return failure

    plan = plan_make(
        directives=directives,
        prompt_tokens=responses_input_tokens(items, instructions=instructions),
        max_tokens=max_tokens,
        choices=1,
    )
    number = next(_ids)
    response_id, message_id, reasoning_id = (
        f"resp_mock{number}",
        f"msg_mock{number}",
        f"rs_mock{number}",
    )
    created = int(time.time())
    status = "incomplete" if plan.truncated else "completed"
    text = completion_text(plan.visible_tokens)
    final_output = [_message_item(message_id, text, status=status)]
    if plan.reasoning_tokens:
        final_output.insert(0, _reasoning_item(reasoning_id))
    usage = None
    if not directives.no_usage:
        usage = usage_as_directed(responses_usage(plan), directives, output_key="output_tokens")

    def response(status: str, output: list[dict[str, Any]], usage: Any) -> dict[str, Any]:
        return _response_object(
            body,
            response_id=response_id,
            created=created,
            model=model,
            status=status,
            output=output,
            usage=usage,
        )

    headers = {"x-request-id": f"req_mock{number}"}
    if not stream:
        await _whole_answer_wait(request, directives, chunks=plan.visible_tokens)
        return web.Response(
            body=_dumps(response(status, final_output, usage)),
            content_type="application/json",
            headers=headers,
        )

    sse = web.StreamResponse(
        headers={
            **headers,
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
        }
    )
    await sse.prepare(request)
    sequence = itertools.count()

    async def send(event_type: str, **fields: Any) -> None:
        payload = {"type": event_type, **fields, "sequence_number": next(sequence)}
        await sse.write(_sse_event(event_type, payload))

    await send("response.created", response=response("in_progress", [], None))
    await send("response.in_progress", response=response("in_progress", [], None))
    message_index = 0
    if plan.reasoning_tokens:
        message_index = 1
        await send("response.output_item.added", output_index=0, item=_reasoning_item(reasoning_id))
        await send("response.output_item.done", output_index=0, item=_reasoning_item(reasoning_id))
    place = {"item_id": message_id, "output_index": message_index, "content_index": 0}
    await send(
        "response.output_item.added",
        output_index=message_index,
        item=_message_item(message_id, "", status="in_progress"),
    )
    empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    await send("response.content_part.added", **place, part=empty_part)
    tokens_to_send = (
        plan.mid_stream_tokens if directives.fail == FAIL_MID_STREAM else plan.visible_tokens
    )
    for position in range(tokens_to_send):
        await _sleep_ms(directives.delay_ms)
        await send(
            "response.output_text.delta", **place, delta=completion_token(position), logprobs=[]
        )
    if directives.fail == FAIL_MID_STREAM:
        # OpenAI ends a stream that failed with an `error` event.
        await send(
            "error", code="server_error", message="mock upstream failed mid-stream", param=None
        )
        await sse.write_eof()
        return sse
    await send("response.output_text.done", **place, text=text, logprobs=[])
    await send("response.content_part.done", **place, part={**empty_part, "text": text})
    await send(
        "response.output_item.done",
        output_index=message_index,
        item=final_output[message_index],
    )
    await send(f"response.{status}", response=response(status, final_output, usage))
    await sse.write_eof()
    return sse


# --- OpenAI Embeddings -----------------------------------------------------------------------

DEFAULT_EMBEDDING_DIMENSIONS = 8


def _embedding_inputs(body: dict[str, Any]) -> list[Any]:
    value = body.get("input")
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(token, int) for token in value):
            return [value]  # one token array
        if all((isinstance(item, str) and item) or isinstance(item, list) for item in value):
            return value
    raise BadRequest("input must be a non-empty string or array", param="input")


def embedding_vector(index: int, dimensions: int) -> list[float]:
    """Input `index`'s vector: eighths, so float32 (base64) holds them exactly."""
    return [((index + position) % 8) / 8 - 0.5 for position in range(dimensions)]


async def openai_embeddings(request: web.Request) -> web.Response:
    """Embeddings: directives are read from every string input; [mock:delay_ms=D] is spent
    once; [mock:tokens] and the token classes do not apply (nothing is generated)."""
    try:
        body = await _json_object(request)
        model = _model(body)
        inputs = _embedding_inputs(body)
        dimensions = _positive_int(body, "dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest("encoding_format must be float or base64", param="encoding_format")
        directives = openai_directives(
            "\n".join(item for item in inputs if isinstance(item, str)), param="input"
        )
    except BadRequest as exc:
        return openai_error(400, exc.message, param=exc.param)
    if (failure := openai_failure_as_directed(directives)) is not None:
        return failure
    await _whole_answer_wait(request, directives, chunks=1)

    data = []
    for index in range(len(inputs)):
        vector = embedding_vector(index, dimensions)
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    response: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if not directives.no_usage:
        prompt = embedding_input_tokens(body["input"])
        response["usage"] = usage_as_directed(
            {"prompt_tokens": prompt, "total_tokens": prompt},
            directives,
            output_key="prompt_tokens",
        )
    return web.Response(body=_dumps(response), content_type="application/json")


def create_app() -> web.Application:
    """The mock upstream. OpenAI base URL: <root>/v1; Anthropic base URL: <root>."""
    app = web.Application(middlewares=[_dropped_connection_middleware])
    app.router.add_post("/v1/chat/completions", openai_chat_completions)
    app.router.add_get("/v1/models", openai_models)
    app.router.add_post("/v1/messages", anthropic_messages)
    app.router.add_post("/v1/responses", openai_responses)
    app.router.add_post("/v1/embeddings", openai_embeddings)
    return app
