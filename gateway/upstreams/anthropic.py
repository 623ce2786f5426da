"""Anthropic Messages: `POST {base}/v1/messages`, base URL without /v1."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

from billing.money import money_str
from billing.pricing import Usage
from gateway.errors import ANTHROPIC, invalid_param
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
    without_nulls,
)
from gateway.upstreams.client import UpstreamFailure, sse_event, sse_fields

DEFAULT_VERSION = "2023-06-01"


def anthropic_usage(raw: dict[str, Any] | None, previous: Usage | None = None) -> Usage | None:
    """Anthropic reports cache reads and writes beside input_tokens. Usage in message_delta is
    cumulative: later values replace earlier ones, fields it omits keep their value. Raises
    UnreadableUsage for a count that is not a non-negative whole number."""
    if not isinstance(raw, dict):
        return previous
    base = previous or Usage()

    def pick(key: str, current: int) -> int:
        value = raw.get(key)
        return current if value is None else token_count(value)

    return Usage(
        input_tokens=pick("input_tokens", base.input_tokens),
        cached_input_tokens=pick("cache_read_input_tokens", base.cached_input_tokens),
        cache_write_tokens=pick("cache_creation_input_tokens", base.cache_write_tokens),
        output_tokens=pick("output_tokens", base.output_tokens),
    )


def anthropic_usage_json(usage: Usage, cost: str) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "output_tokens": usage.output_tokens,
        "cost": cost,
        "estimated": usage.estimated,
    }


class AnthropicStreamState(StreamState):
    message_delta: dict[str, Any] | None = None
    # message_start's output count is a placeholder: the usage is the provider's full report
    # only once message_delta has given the final one, and no report was unreadable.
    output_final: bool = False
    doubtful: bool = False

    def reported_usage(self) -> Usage | None:
        if self.usage is None or (self.output_final and not self.doubtful):
            return self.usage
        return dataclasses.replace(self.usage, estimated=True)

    def _read_usage(self, raw: Any) -> None:
        try:
            self.usage = anthropic_usage(raw, self.usage)
        except UnreadableUsage as exc:
            unreadable_usage_log(exc)
            self.doubtful = True

    def feed(self, event: bytes) -> bytes | None:
        name, data = sse_fields(event)
        if not data:
            return event
        if name == "content_block_delta":
            # Text only (usage and errors come in other events): relay it unparsed.
            self.unparsed.append(data)
            return event
        payload = json_object(data)
        kind = payload.get("type") or name
        if kind == "message_start":
            self._read_usage(as_dict(payload.get("message")).get("usage"))
        elif kind == "content_block_delta":
            self.texts.extend(self.content_texts(payload))
        elif kind == "message_delta":
            self._read_usage(payload.get("usage"))
            self.output_final = as_dict(payload.get("usage")).get("output_tokens") is not None
            self.message_delta = payload
            return None  # re-sent after the settle, with the cost
        elif kind == "message_stop":
            self.finished = True
            return None
        elif kind == "error":
            raise UpstreamFailure("protocol", "the upstream sent an error event")
        return event

    def content_texts(self, payload: dict[str, Any]) -> list[str]:
        delta = as_dict(payload.get("delta"))
        text = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
        return [text] if isinstance(text, str) and text else []

    def closing(self, *, usage: Usage, cost: Decimal) -> bytes:
        delta = self.message_delta or {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        }
        delta = {**delta, "usage": anthropic_usage_json(usage, money_str(cost))}
        return sse_event(delta, "message_delta") + sse_event(
            {"type": "message_stop"}, "message_stop"
        )


# Every field parse reads: sent as null, each is absent (and is not forwarded as a null).
READ_FIELDS = ("model", "messages", "stream", "max_tokens", "system")


class AnthropicMessages(Adapter):
    endpoint = "messages"
    style = ANTHROPIC

    @classmethod
    def parse(cls, body: Any) -> ParsedRequest:
        # A null is an absent field: `"max_tokens": null` is the 400 of a missing max_tokens.
        body = without_nulls(body_object(body), READ_FIELDS)
        model = require_model(body)
        messages = require_messages(body)
        stream = require_bool(body, "stream")
        if "max_tokens" not in body:
            raise invalid_param("max_tokens", "'max_tokens' is required.")
        max_tokens = require_int(body, "max_tokens", minimum=1, maximum=ABSURD_MAX_TOKENS)
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise invalid_param("system", "'system' must be a string or an array of blocks.")
        return ParsedRequest(
            body=body,
            model=model,
            messages=messages,
            stream=stream,
            include_usage=True,
            max_output_tokens=max_tokens,
            max_tokens_param="max_tokens",
            system=system,
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
        body["max_tokens"] = max_output_tokens
        headers = {
            "Content-Type": "application/json",
            "anthropic-version": anthropic_version or DEFAULT_VERSION,
        }
        if target.api_key:
            headers["x-api-key"] = target.api_key
        return f"{target.base_url.rstrip('/')}/v1/messages", headers, body

    @classmethod
    def usage_from_body(cls, body: dict[str, Any]) -> Usage | None:
        raw = body.get("usage")
        try:
            usage = anthropic_usage(raw)
        except UnreadableUsage as exc:
            unreadable_usage_log(exc)
            return None
        return usage_marked(usage, raw, counts=("input_tokens", "output_tokens"))

    @classmethod
    def texts_from_body(cls, body: dict[str, Any]) -> list[str]:
        return [
            block["text"]
            for block in as_list(body.get("content"))
            if isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        ]

    @classmethod
    def with_cost(cls, body: dict[str, Any], *, usage: Usage, cost: str) -> dict[str, Any]:
        return {**body, "usage": anthropic_usage_json(usage, cost)}

    @classmethod
    def stream_state(cls, parsed: ParsedRequest) -> StreamState:
        return AnthropicStreamState(parsed=parsed)

    @classmethod
    def stream_error(cls, message: str) -> bytes:
        return sse_event(
            {"type": "error", "error": {"type": "api_error", "message": message}}, "error"
        )
