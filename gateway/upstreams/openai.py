"""OpenAI Chat Completions: `POST {base}/chat/completions`, base URL including /v1."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from billing.money import money_str
from billing.pricing import Usage
from gateway.errors import OPENAI, invalid_param
from gateway.upstreams.base import (
    ABSURD_MAX_TOKENS,
    Adapter,
    ParsedRequest,
    StreamState,
    UnreadableUsage,
    UpstreamTarget,
    as_dict,
    as_list,
    body_object,
    json_object,
    require_bool,
    require_int,
    require_messages,
    require_model,
    token_count,
    unreadable_usage_log,
    usage_marked,
    usage_part,
    without_nulls,
)
from gateway.upstreams.client import sse_event, sse_fields


@dataclass(frozen=True)
class UsageNames:
    """Where an OpenAI endpoint's usage object keeps its counts: Chat Completions and the
    Responses API name them differently, with the same meaning."""

    input: str
    output: str
    input_details: str
    output_details: str


CHAT_USAGE = UsageNames(
    "prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"
)


def openai_usage(raw: dict[str, Any] | None, names: UsageNames = CHAT_USAGE) -> Usage | None:
    """OpenAI counts cached tokens inside the input count and reasoning inside the output
    count. None when absent or unreadable: the pipeline then bills its own count."""
    if not isinstance(raw, dict):
        return None
    try:
        prompt = token_count(raw.get(names.input))
        completion = token_count(raw.get(names.output))
        cached = token_count(usage_part(raw, names.input_details).get("cached_tokens"))
        reasoning = token_count(usage_part(raw, names.output_details).get("reasoning_tokens"))
    except UnreadableUsage as exc:
        unreadable_usage_log(exc)
        return None
    usage = Usage(
        input_tokens=max(prompt - cached, 0),
        cached_input_tokens=cached,
        output_tokens=completion,
        reasoning_tokens=reasoning,
    )
    return usage_marked(usage, raw, counts=(names.input, names.output))


def openai_usage_json(usage: Usage, cost: str, names: UsageNames = CHAT_USAGE) -> dict[str, Any]:
    return {
        names.input: usage.prompt_tokens,
        names.output: usage.output_tokens,
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
        names.input_details: {"cached_tokens": usage.cached_input_tokens},
        names.output_details: {"reasoning_tokens": usage.reasoning_tokens},
        "cost": cost,
        "estimated": usage.estimated,
    }


def choice_texts(payload: dict[str, Any], *, part: str) -> list[str]:
    """The text of each choice's `part` ("delta" in a chunk, "message" in a body)."""
    texts = []
    for choice in as_list(payload.get("choices")):
        content = as_dict(as_dict(choice).get(part)).get("content")
        if isinstance(content, str) and content:
            texts.append(content)
    return texts


# A chunk whose "usage" is present and not null (with include_usage, every chunk has
# "usage": null until the last one).
_CARRIES_USAGE = re.compile(rb'"usage"\s*:(?!\s*null)')


class OpenAIStreamState(StreamState):
    usage_chunk: dict[str, Any] | None = None

    def feed(self, event: bytes) -> bytes | None:
        _, data = sse_fields(event)
        if data == b"[DONE]":
            self.finished = True
            return None
        if not data:
            return event
        if b'"error"' not in data and not _CARRIES_USAGE.search(data):
            # A plain content chunk (JSON-escaped text cannot match either key): relay it.
            self.unparsed.append(data)
            return event
        chunk = json_object(data)
        if "error" in chunk and "choices" not in chunk:
            from gateway.upstreams.client import UpstreamFailure

            raise UpstreamFailure("protocol", "the upstream sent an error event")
        usage = chunk.get("usage")
        if usage:
            self.usage = openai_usage(usage)
        choices = as_list(chunk.get("choices"))
        self.texts.extend(self.content_texts(chunk))
        if usage and not choices:
            # The usage chunk goes out after the settle, with its cost (or not at all).
            self.usage_chunk = chunk
            return None
        return event

    def content_texts(self, payload: dict[str, Any]) -> list[str]:
        return choice_texts(payload, part="delta")

    def closing(self, *, usage: Usage, cost: Decimal) -> bytes:
        parts = []
        if self.parsed.include_usage:
            chunk = self.usage_chunk or {
                "object": "chat.completion.chunk",
                "model": self.parsed.model,
                "choices": [],
            }
            chunk = {**chunk, "usage": openai_usage_json(usage, money_str(cost))}
            parts.append(sse_event(chunk))
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)


def openai_url(target: UpstreamTarget, path: str) -> str:
    """`{base}/{path}`: an OpenAI upstream's base URL includes /v1."""
    return f"{target.base_url.rstrip('/')}/{path}"


def openai_route_check(*, model: str, upstream_kind: str, path: str) -> None:
    """A 400 unless the route's upstream speaks OpenAI's API (the endpoint at `path` exists
    only there)."""
    if upstream_kind != "openai":
        raise invalid_param(
            "model",
            f"The model '{model}' is served by an {upstream_kind} upstream; {path} is served "
            "for OpenAI upstreams only.",
        )


def openai_headers(target: UpstreamTarget) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    return headers


# The two names of the output limit, the current one first: it wins a tie.
LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")
# Every field parse reads: sent as null, each is absent (and is not forwarded as a null).
READ_FIELDS = ("model", "messages", "stream", "stream_options", "n", *LIMIT_FIELDS)


def output_limit(body: dict[str, Any]) -> tuple[str, int | None]:
    """The output limit the client asked for and the field that carries it. Each limit given
    is checked; when both are, the smaller applies. Neither: ("max_tokens", None), and the
    pipeline holds for the route's maximum."""
    given = {
        name: limit
        for name in LIMIT_FIELDS
        if (limit := require_int(body, name, minimum=1, maximum=ABSURD_MAX_TOKENS)) is not None
    }
    if not given:
        return "max_tokens", None
    param = min(given, key=given.__getitem__)  # the first of LIMIT_FIELDS on a tie
    return param, given[param]


class OpenAIChat(Adapter):
    endpoint = "chat.completions"
    style = OPENAI

    @classmethod
    def parse(cls, body: Any) -> ParsedRequest:
        # A null is an absent field (the official SDK sends `"max_completion_tokens": null`
        # beside `"max_tokens": 1` for max_tokens=1, max_completion_tokens=None).
        body = without_nulls(body_object(body), READ_FIELDS)
        model = require_model(body)
        messages = require_messages(body)
        stream = require_bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise invalid_param("stream_options", "'stream_options' must be an object.")
        include_usage = bool(options and options.get("include_usage") is True)
        param, max_tokens = output_limit(body)
        n = require_int(body, "n", minimum=1, maximum=128) or 1
        return ParsedRequest(
            body=body,
            model=model,
            messages=messages,
            stream=stream,
            include_usage=include_usage,
            max_output_tokens=max_tokens,
            max_tokens_param=param,
            n=n,
        )

    @classmethod
    def upstream_request(
        cls,
        parsed: ParsedRequest,
        target: UpstreamTarget,
        *,
        max_output_tokens: int,
        anthropic_version: str | None,
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        body = dict(parsed.body)
        body["model"] = target.upstream_model
        # Always bound the output we may have to pay for by what the hold covers, with exactly
        # one limit: two would leave the upstream to choose (OpenAI refuses both at once).
        for name in LIMIT_FIELDS:
            body.pop(name, None)
        body[parsed.max_tokens_param] = max_output_tokens
        if parsed.stream:
            # Always ask for usage; the pipeline strips it if the client did not.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return openai_url(target, "chat/completions"), openai_headers(target), body

    @classmethod
    def usage_from_body(cls, body: dict[str, Any]) -> Usage | None:
        return openai_usage(body.get("usage"))

    @classmethod
    def texts_from_body(cls, body: dict[str, Any]) -> list[str]:
        return choice_texts(body, part="message")

    @classmethod
    def with_cost(cls, body: dict[str, Any], *, usage: Usage, cost: str) -> dict[str, Any]:
        return {**body, "usage": openai_usage_json(usage, cost)}

    @classmethod
    def stream_state(cls, parsed: ParsedRequest) -> StreamState:
        return OpenAIStreamState(parsed=parsed)

    @classmethod
    def stream_error(cls, message: str) -> bytes:
        return sse_event(
            {
                "error": {
                    "message": message,
                    "type": "server_error",
                    "param": None,
                    "code": "upstream_error",
                }
            }
        )
