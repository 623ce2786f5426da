"""The OpenAI Responses API: `POST {base}/responses`, base URL including /v1.

Streams are typed server-sent events (`event: response.created`, ...,
`response.output_text.delta`, ..., `response.completed`); usage comes in the terminal
event's response. The gateway stores nothing, so the parameters that need a stored response
(`store`, `previous_response_id`, `conversation`, `background`) are refused before anything is
held, and `store: false` is always forwarded: the upstream keeps nothing we could not serve.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing.money import money_str
from billing.pricing import Usage
from gateway.errors import OPENAI, GatewayError, invalid_param
from gateway.tokens import responses_input_tokens
from gateway.upstreams.base import (
    ABSURD_MAX_TOKENS,
    Adapter,
    ParsedRequest,
    StreamState,
    UpstreamTarget,
    as_dict,
    as_list,
    body_object,
    json_object,
    require_bool,
    require_int,
    require_model,
    without_nulls,
)
from gateway.upstreams.client import UpstreamFailure, sse_event, sse_fields
from gateway.upstreams.openai import (
    UsageNames,
    openai_headers,
    openai_route_check,
    openai_url,
    openai_usage,
)
from gateway.upstreams.openai import openai_usage_json as _usage_json

RESPONSES_USAGE = UsageNames(
    "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"
)
# OpenAI's own lower bound for max_output_tokens.
MIN_OUTPUT_TOKENS = 16
# Parameters that only make sense with responses stored upstream, which we cannot serve.
STORED_STATE_PARAMS = ("previous_response_id", "conversation")
# A stream's last event: its response carries the usage (incomplete: cut by max_output_tokens).
TERMINAL_EVENTS = ("response.completed", "response.incomplete")
FAILURE_EVENTS = ("error", "response.failed")
# Every field parse reads: sent as null, each is absent (and is not forwarded as a null).
READ_FIELDS = (
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "stream",
    "store",
    "background",
    *STORED_STATE_PARAMS,
)


def not_served(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", "unsupported_parameter", param)


def stored_response_refusal() -> GatewayError:
    """Retrieving (or deleting, cancelling, listing the input of) a stored response: nothing
    is stored here, so there is nothing to find, and nothing is billed."""
    return not_served(
        "response_id",
        "Stored responses are not served by this gateway: it stores none. Send the whole "
        "conversation as 'input' instead.",
    )


def responses_usage(raw: Any) -> Usage | None:
    return openai_usage(raw, RESPONSES_USAGE)


def responses_usage_json(usage: Usage, cost: str) -> dict[str, Any]:
    return _usage_json(usage, cost, RESPONSES_USAGE)


def _require_input(body: dict[str, Any]) -> str | list[Any]:
    value = body.get("input")
    if isinstance(value, str):
        if not value:
            raise invalid_param("input", "'input' must not be empty.")
        return value
    if not isinstance(value, list) or not value:
        raise invalid_param("input", "'input' must be a string or a non-empty array of items.")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise invalid_param(f"input[{index}]", "each input item must be an object.")
        role = item.get("role")
        if role is None:
            if not isinstance(item.get("type"), str):
                raise invalid_param(
                    f"input[{index}]", "each input item needs a 'role' or a 'type'."
                )
            continue
        if not isinstance(role, str):
            raise invalid_param(f"input[{index}].role", "'role' must be a string.")
        if not isinstance(item.get("content"), str | list):
            raise invalid_param(
                f"input[{index}].content", "'content' must be a string or an array of parts."
            )
    return value


def _refuse_stored_state(body: dict[str, Any]) -> None:
    for param in STORED_STATE_PARAMS:
        if param in body:
            raise not_served(
                param,
                f"'{param}' is not supported: this gateway stores no responses. Send the whole "
                "conversation as 'input' instead.",
            )
    if require_bool(body, "store"):
        raise not_served("store", "'store' is not supported: this gateway stores no responses.")
    if require_bool(body, "background"):
        raise not_served(
            "background",
            "'background' is not supported: a background response must be retrieved later, and "
            "this gateway stores no responses.",
        )


def output_texts(response: dict[str, Any]) -> list[str]:
    """The generated text of a response object's output items: message text and refusals,
    function call arguments, reasoning summaries."""
    texts: list[str] = []
    for item in as_list(response.get("output")):
        item = as_dict(item)
        parts = as_list(item.get("content")) + as_list(item.get("summary"))
        for part in map(as_dict, parts):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str) and text:
                texts.append(text)
        arguments = item.get("arguments")
        if isinstance(arguments, str) and arguments:
            texts.append(arguments)
    return texts


class ResponsesStreamState(StreamState):
    # The terminal event, held back and re-sent after the settle with the cost.
    terminal: dict[str, Any] | None = None
    terminal_name: str = "response.completed"
    # Events relayed or held back: OpenAI numbers a stream's events from 0, so this is the
    # next one's number.
    events: int = 0

    def feed(self, event: bytes) -> bytes | None:
        name, data = sse_fields(event)
        if not data:
            return event
        self.events += 1
        if name.endswith(".delta"):
            # Generated text only (usage and errors come in other events): relay it unparsed.
            self.unparsed.append(data)
            return event
        payload = json_object(data)
        kind = payload.get("type") or name
        if not isinstance(kind, str):
            return event
        if kind.endswith(".delta"):
            self.texts.extend(self.content_texts(payload))
        elif kind in TERMINAL_EVENTS:
            self.usage = responses_usage(as_dict(payload.get("response")).get("usage"))
            self.terminal, self.terminal_name = payload, kind
            self.finished = True
            return None
        elif kind in FAILURE_EVENTS:
            self.events -= 1  # not relayed: the gateway's own error event takes its number
            raise UpstreamFailure("protocol", f"the upstream sent {kind}")
        return event

    def content_texts(self, payload: dict[str, Any]) -> list[str]:
        delta = payload.get("delta")
        return [delta] if isinstance(delta, str) and delta else []

    def closing(self, *, usage: Usage, cost: Decimal) -> bytes:
        terminal = self.terminal or {"type": self.terminal_name, "sequence_number": self.events}
        response = {
            **as_dict(terminal.get("response")),
            "usage": responses_usage_json(usage, money_str(cost)),
        }
        return sse_event({**terminal, "response": response}, self.terminal_name)

    def failure_event(self, message: str) -> bytes | None:
        return error_event(message, sequence_number=self.events)


def error_event(message: str, *, sequence_number: int) -> bytes:
    """The Responses API's `error` event."""
    return sse_event(
        {
            "type": "error",
            "code": "upstream_error",
            "message": message,
            "param": None,
            "sequence_number": sequence_number,
        },
        "error",
    )


class OpenAIResponses(Adapter):
    endpoint = "responses"
    style = OPENAI

    @classmethod
    def parse(cls, body: Any) -> ParsedRequest:
        body = without_nulls(body_object(body), READ_FIELDS)
        model = require_model(body)
        _refuse_stored_state(body)
        _require_input(body)
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise invalid_param("instructions", "'instructions' must be a string.")
        stream = require_bool(body, "stream")
        max_output = require_int(
            body, "max_output_tokens", minimum=MIN_OUTPUT_TOKENS, maximum=ABSURD_MAX_TOKENS
        )
        return ParsedRequest(
            body=body,
            model=model,
            messages=[],  # the input is counted by prompt_tokens, from the body
            stream=stream,
            include_usage=True,  # response.completed always carries the usage
            max_output_tokens=max_output,
            max_tokens_param="max_output_tokens",
            system=instructions,
        )

    @classmethod
    def prompt_tokens(cls, parsed: ParsedRequest) -> int:
        return responses_input_tokens(parsed.body["input"], instructions=parsed.system)

    @classmethod
    def route_check(cls, *, model: str, upstream_kind: str) -> None:
        openai_route_check(model=model, upstream_kind=upstream_kind, path="/v1/responses")

    @classmethod
    def upstream_request(
        cls,
        parsed: ParsedRequest,
        target: UpstreamTarget,
        *,
        max_output_tokens: int,
        anthropic_version: str | None,
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        # The output we may have to pay for is bounded by what the hold covers.
        body = {
            **parsed.body,
            "model": target.upstream_model,
            "max_output_tokens": max_output_tokens,
            "store": False,
        }
        return openai_url(target, "responses"), openai_headers(target), body

    @classmethod
    def usage_from_body(cls, body: dict[str, Any]) -> Usage | None:
        return responses_usage(body.get("usage"))

    @classmethod
    def texts_from_body(cls, body: dict[str, Any]) -> list[str]:
        return output_texts(body)

    @classmethod
    def with_cost(cls, body: dict[str, Any], *, usage: Usage, cost: str) -> dict[str, Any]:
        return {**body, "usage": responses_usage_json(usage, cost)}

    @classmethod
    def stream_state(cls, parsed: ParsedRequest) -> StreamState:
        return ResponsesStreamState(parsed=parsed)

    @classmethod
    def stream_error(cls, message: str) -> bytes:
        return error_event(message, sequence_number=0)
