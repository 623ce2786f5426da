"""What the completion endpoints' ASGI app (gateway/handler.py) and the pipeline pass each
other: the request as read off the wire, and the answer to send.

Plain objects, not Django's HttpRequest and HttpResponse: the completion endpoints are served
without Django's request handling (see gateway/handler.py for why), and the pipeline needs
only the body and a few headers.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.auth import key_secret
from gateway.errors import GatewayError, error_body


def request_id_new() -> str:
    return "req_" + secrets.token_hex(16)  # 32 hex digits, as uuid4().hex but cheaper


@dataclass(frozen=True)
class CompletionRequest:
    request_id: str
    body: bytes
    headers: Mapping[str, str]  # names lower-cased, as ASGI gives them

    @property
    def content_type(self) -> str:
        """The media type, without parameters (as Django's request.content_type)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    @property
    def secret(self) -> str:
        return key_secret(
            authorization=self.headers.get("authorization", ""),
            x_api_key=self.headers.get("x-api-key", ""),
        )


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


def error_answer(error: GatewayError, style: str) -> JsonAnswer:
    answer = JsonAnswer(error_body(error, style), status=error.status)
    if error.status == 401:
        answer.headers["www-authenticate"] = "Bearer"
    return answer
