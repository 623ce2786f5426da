"""What the completion views (gateway/views.py) and the pipeline pass each other: the request
as the pipeline needs it (its id, body and headers), and the answer, which the view turns into
Django's response.

Plain objects, not Django's HttpRequest and HttpResponse: the pipeline needs only the body and
a few headers, and its answers are built before the view knows how they will be sent.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from asgiref.sync import async_to_sync
from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse

from gateway.errors import GatewayError


def request_id_new() -> str:
    return "req_" + secrets.token_hex(16)  # 32 hex digits, as uuid4().hex but cheaper


@dataclass(frozen=True)
class CompletionRequest:
    request_id: str
    body: bytes
    # Looked up by lower-case name: ASGI's names, or Django's case-insensitive request.headers.
    headers: Mapping[str, str]

    @property
    def content_type(self) -> str:
        """The media type, without parameters (as Django's request.content_type)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()


class MetaHeaders(Mapping[str, str]):
    """A Django request's headers by lower-case name, read from its META as asked: Django's
    request.headers builds a dict of every header, and the pipeline reads two or three."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.meta = meta

    @staticmethod
    def _key(name: str) -> str:
        key = name.upper().replace("-", "_")
        return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"

    def __getitem__(self, name: str) -> str:
        return str(self.meta[self._key(name)])

    def __iter__(self) -> Iterator[str]:
        for key in self.meta:
            if key.startswith("HTTP_"):
                yield key[5:].lower().replace("_", "-")
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                yield key.lower().replace("_", "-")

    def __len__(self) -> int:
        return sum(1 for _ in self)


def request_json(request: CompletionRequest) -> Any:
    """The JSON body (strict: no NaN or Infinity), or a 400 / 415 GatewayError. A request
    without a content type is read as JSON, as the providers do."""
    content_type = request.content_type or "application/json"
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise GatewayError(
            415,
            "Send the body as application/json.",
            "invalid_request_error",
            "unsupported_media_type",
        )
    try:
        return orjson.loads(request.body)  # strict: no NaN or Infinity, valid UTF-8 only
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            400,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            "invalid_json",
        ) from exc


@dataclass(slots=True)
class JsonAnswer:
    """A whole JSON response."""

    payload: dict[str, Any]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        return orjson.dumps(self.payload)


@dataclass(slots=True)
class StreamAnswer:
    """A streamed response: its body chunks, relayed as they come."""

    chunks: AsyncGenerator[bytes, None]
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


class ClosingStream:
    """The pipeline's async generator as a StreamingHttpResponse's content, closed with the
    response. Django's ASGI handler iterates the generator on the event loop; if the client
    leaves while a chunk is being sent, it stops iterating without closing it. Django closes
    the response then (Response.close, from a request thread): a stream left unfinished is
    closed there, on the loop, so the pipeline settles what was relayed before the request
    ends."""

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        self.chunks = chunks

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self.chunks

    def close(self) -> None:
        if getattr(self.chunks, "ag_frame", None) is not None:  # not run to its end
            async_to_sync(self._aclose)()

    async def _aclose(self) -> None:
        await self.chunks.aclose()


def answer_response(answer: JsonAnswer | StreamAnswer) -> HttpResponseBase:
    """Django's response for the pipeline's answer, its headers included. A stream is a
    StreamingHttpResponse over the pipeline's async generator: Django's ASGI handler iterates
    it on the event loop, sending each chunk as it is produced."""
    response: HttpResponseBase
    if isinstance(answer, JsonAnswer):
        response = HttpResponse(
            answer.body(), status=answer.status, content_type="application/json"
        )
    else:
        response = StreamingHttpResponse(
            ClosingStream(answer.chunks), content_type=answer.content_type
        )
    for name, value in answer.headers.items():
        response[name] = value
    return response
