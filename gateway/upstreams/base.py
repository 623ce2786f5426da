"""What every endpoint adapter provides to the one billing pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

import orjson

from billing.pricing import Usage
from gateway.errors import GatewayError, invalid_param
from gateway.tokens import messages_tokens, text_tokens

logger = logging.getLogger(__name__)

# Anything above this is a client bug, whatever the route allows.
ABSURD_MAX_TOKENS = 10_000_000
# The model alias columns' width (varchar(200): LanguageModel.alias, and model_alias on holds,
# usage records and postings): a longer name can name no model, and no row can store it.
MODEL_MAX_LENGTH = 200


@dataclass
class ParsedRequest:
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool  # the client asked to see the usage chunk (OpenAI streams)
    max_output_tokens: int | None  # what the client asked for, if anything
    max_tokens_param: str
    n: int = 1
    system: Any = None


@dataclass
class UpstreamTarget:
    """Where and how to call for one route (read from the route cache)."""

    kind: str
    base_url: str
    api_key: str
    upstream_model: str
    connect_timeout: float
    read_timeout: float


def json_object(data: bytes) -> dict[str, Any]:
    """An upstream event's JSON object; ValueError (a protocol failure) for anything else."""
    payload = orjson.loads(data)
    if not isinstance(payload, dict):
        raise ValueError("an upstream event is not a JSON object")
    return payload


def as_dict(value: Any) -> dict[str, Any]:
    """A nested JSON object from an upstream; a malformed part counts as absent."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


class UnreadableUsage(ValueError):
    """An upstream's usage with a count that is not a non-negative integer."""


def token_count(value: Any) -> int:
    """A token count as an upstream reports it (absent: 0). Anything but a non-negative whole
    number is unreadable: billing from it could charge too little, or a negative amount."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnreadableUsage(f"token count {value!r}")
    if value < 0 or (isinstance(value, float) and not value.is_integer()):
        raise UnreadableUsage(f"token count {value!r}")
    return int(value)


def unreadable_usage_log(exc: UnreadableUsage) -> None:
    logger.warning("unreadable upstream usage (%s); billing at least our own count", exc)


def usage_marked(usage: Usage | None, raw: Any, *, counts: tuple[str, ...]) -> Usage | None:
    """`usage`, marked estimated when the report lacks one of its main `counts`: a missing
    output count read as zero would bill a long answer as free."""
    if usage is None or all(as_dict(raw).get(key) is not None for key in counts):
        return usage
    return dataclasses.replace(usage, estimated=True)


def usage_part(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested usage object (absent: empty), or UnreadableUsage."""
    part = raw.get(key)
    if part is None:
        return {}
    if not isinstance(part, dict):
        raise UnreadableUsage(f"{key} {part!r}")
    return part


def without_nulls(body: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `body` in which each of `fields` sent as null is absent: the adapters read a
    null as "not given" and forward what they read, never the null beside it."""
    return {key: value for key, value in body.items() if value is not None or key not in fields}


def require_int(body: dict[str, Any], param: str, *, minimum: int, maximum: int) -> int | None:
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_param(param, f"'{param}' must be an integer.")
    if value < minimum:
        raise invalid_param(param, f"'{param}' must be at least {minimum}.")
    if value > maximum:
        raise invalid_param(param, f"'{param}' must be at most {maximum}.")
    return value


def require_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_param("messages", "'messages' must be a non-empty array.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid_param(f"messages[{index}]", "each message needs a string 'role'.")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_param(
                f"messages[{index}].content", "'content' must be a string or an array of parts."
            )
    return messages


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid_param("model", "'model' is required and must be a string.")
    return storable_text(model, "model", max_length=MODEL_MAX_LENGTH)


def storable_text(value: str, param: str, *, max_length: int) -> str:
    """`value` if the database can store it as it is, else the client's 400 naming `param`:
    decided here, before any database work, so it can never look like an outage (a 503) to
    anyone. PostgreSQL text cannot hold NUL; a lone surrogate cannot get past the JSON parser
    (orjson refuses it, and invalid UTF-8). Every string a request carries into the database
    passes through here: today that is the model alias (holds, usage records, postings)."""
    if "\x00" in value:
        raise invalid_param(param, f"'{param}' must not contain NUL (\\u0000) characters.")
    if len(value) > max_length:
        raise invalid_param(param, f"'{param}' must be at most {max_length} characters long.")
    return value


def require_bool(body: dict[str, Any], param: str) -> bool:
    value = body.get(param, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_param(param, f"'{param}' must be a boolean.")
    return value


@dataclass
class StreamState:
    """Per-stream bookkeeping: what to relay, what to hold back until the settle commits."""

    parsed: ParsedRequest
    usage: Usage | None = None
    texts: list[str] = field(default_factory=list)
    # Content events relayed as bytes without parsing them: their text is only needed when the
    # usage has to be estimated (the stream broke, or the provider reported none).
    unparsed: list[bytes] = field(default_factory=list)
    finished: bool = False  # the provider's own end marker arrived

    def feed(self, event: bytes) -> bytes | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def closing(self, *, usage: Usage, cost: Decimal) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def content_texts(self, payload: dict[str, Any]) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def reported_usage(self) -> Usage | None:
        """The provider's usage so far, marked estimated unless it is its complete report."""
        return self.usage

    def generated_texts(self) -> list[str]:
        """Every generated text so far, parsing the events relayed unparsed."""
        for data in self.unparsed:
            # Only for an estimate, after the relay: an event that does not parse counts as
            # no text rather than leaving the request unsettled.
            with contextlib.suppress(ValueError):
                self.texts.extend(self.content_texts(json_object(data)))
        self.unparsed.clear()
        return self.texts

    def generated_tokens(self) -> int:
        return sum(text_tokens(text) for text in self.generated_texts())

    def failure_event(self, message: str) -> bytes | None:
        """The event that ends a stream the upstream broke, when it depends on the stream
        (a numbered event); None: the adapter's stream_error."""
        return None


class Adapter:
    """Wire format of one endpoint: validation, upstream request, usage, errors."""

    endpoint: ClassVar[str]
    style: ClassVar[str]
    stream_content_type: ClassVar[str] = "text/event-stream"

    @classmethod
    def parse(cls, body: Any) -> ParsedRequest:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def prompt_tokens(cls, parsed: ParsedRequest) -> int:
        """Our count of the request's input, without the hold's margin."""
        return messages_tokens(parsed.messages, system=parsed.system)

    @classmethod
    def route_check(cls, *, model: str, upstream_kind: str) -> None:
        """Raise the client's GatewayError if this endpoint cannot be served by the route's
        kind of upstream (checked before anything is held)."""

    @classmethod
    def upstream_request(
        cls,
        parsed: ParsedRequest,
        target: UpstreamTarget,
        *,
        max_output_tokens: int,
        anthropic_version: str | None,
    ) -> tuple[str, dict[str, str], dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def usage_from_body(cls, body: dict[str, Any]) -> Usage | None:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def texts_from_body(cls, body: dict[str, Any]) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def with_cost(
        cls, body: dict[str, Any], *, usage: Usage, cost: str
    ) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def stream_state(cls, parsed: ParsedRequest) -> StreamState:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def stream_error(cls, message: str) -> bytes:  # pragma: no cover
        raise NotImplementedError


def body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", param=None)
    return body
