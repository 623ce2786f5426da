"""The request body limit of everything under /v1/: one ASGI wrapper, `BodyLimit`, which
config/asgi.py puts in front of the completion app and Django's handler alike, so whatever
serves a /v1/ path behind it never sees more than GATEWAY_MAX_BODY_BYTES of a body.

- A declared Content-Length over the limit is answered 413 at once, before any of the body is
  read (and before uvicorn sends a `100 Continue`, so a client that waits for one sends none).
- A body without a declared length (chunked) is counted as it arrives: the app gets it message
  by message until the count passes the limit; then the app is told the client has gone (an
  `http.disconnect`, on which Django's handler and the completion app both stop reading and
  answer nothing) and the wrapper answers 413. The message that passed the limit is never
  handed on, so Django spools at most the limit.
- A declared length within the limit costs one scan of the header list and nothing more: the
  HTTP server delivers no more than the declared length.

The 413 is sent first, then the rest of the body is read and thrown away, up to
LINGER_BODY_FACTOR x the limit in all and for LINGER_SECONDS at most (nginx's lingering close),
and only then is the response ended, with `connection: close`. Closing with the client's
bytes unread makes the kernel reset the connection, and a client that sends its whole body
before reading (urllib, curl, most SDKs) would see the reset and never the 413.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any

import orjson
from django.conf import settings

from billing import metrics
from gateway.errors import error_body, style_for_path, too_large
from gateway.http import request_id_new

# A refused body is read and thrown away up to this many times the limit, for this long at most.
LINGER_BODY_FACTOR = 4
LINGER_SECONDS = 30.0

_DISCONNECT = {"type": "http.disconnect"}


def _declared_length(headers: Any) -> int | None:
    """The Content-Length the client declared, or None (none, or not a length: then the body
    is counted as it arrives). ASGI header names are lower-case bytes."""
    for name, value in headers:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                return None
            return declared if declared >= 0 else None
    return None


class BodyLimit:
    """ASGI middleware: no body over GATEWAY_MAX_BODY_BYTES reaches `app` (module docstring).

    `routes` are the paths the request metrics name by themselves (the completion app's);
    a refusal on any other path is counted as "unmatched", as Django's resolver has not run.
    """

    def __init__(self, app: Any, *, routes: Collection[str] = ()) -> None:
        self.app = app
        self.routes = frozenset(routes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = settings.GATEWAY_MAX_BODY_BYTES
        declared = _declared_length(scope.get("headers", ()))
        if declared is None:
            await self._counted(scope, receive, send, limit=limit)
        elif declared > limit:
            await self._refuse(scope, receive, send, limit=limit, received=0, started=None)
        else:
            await self.app(scope, receive, send)

    async def _counted(self, scope: dict[str, Any], receive: Any, send: Any, *, limit: int) -> None:
        started = time.monotonic()
        received = 0
        over = False  # the body passed the limit: the app was told the client left
        ended = False  # the client sent the body's last message
        answered = False  # the app started a response

        async def counted_receive() -> dict[str, Any]:
            nonlocal received, over, ended
            if over:
                return _DISCONNECT
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if received > limit:
                    over = True
                    return _DISCONNECT
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal answered
            if over and not answered:
                return  # the app was told the client left: the 413 is this wrapper's
            answered = True
            await send(message)

        await self.app(scope, counted_receive, watched_send)
        if over and not answered:
            await self._refuse(
                scope, receive, send, limit=limit, received=received, started=started, ended=ended
            )

    async def _refuse(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        *,
        limit: int,
        received: int,
        started: float | None,
        ended: bool = False,
    ) -> None:
        path = scope.get("path", "")
        route = path[1:] if path in self.routes else "unmatched"
        metrics.REQUESTS.labels(route, "413").inc()
        now = time.monotonic()
        metrics.REQUEST_LATENCY.labels(route).observe(now - (started or now))
        body = orjson.dumps(error_body(too_large(), style_for_path(path)))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id_new().encode()),
            (b"x-content-type-options", b"nosniff"),
        ]
        if not ended:
            # What is left of the body is not read to its end: the connection cannot be reused.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        # The whole answer is on the wire now; the response ends once the body is discarded.
        await send({"type": "http.response.body", "body": body, "more_body": True})
        if not ended:
            await _discard(receive, budget=LINGER_BODY_FACTOR * limit - received)
        await send({"type": "http.response.body", "body": b""})


async def _discard(receive: Any, *, budget: int) -> None:
    """Read and drop the body's rest until it ends, the client leaves, `budget` bytes have been
    read or LINGER_SECONDS have passed, whichever comes first. Nothing of it is kept."""
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while budget > 0:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        pass
