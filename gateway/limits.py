"""The limits of everything under /v1/: two ASGI wrappers, which config/asgi.py puts in front of
Django's handler, so whatever serves a /v1/ path behind them never sees more than
GATEWAY_MAX_BODY_BYTES of a body, waits no longer than GATEWAY_BODY_TIMEOUT_SECONDS for one, and
runs alongside at most GATEWAY_MAX_OPEN_REQUESTS - 1 other /v1/ requests of its process. Both
hold under any ASGI server run with no flags.

`OpenRequestLimit`, outermost: a /v1/ request beyond GATEWAY_MAX_OPEN_REQUESTS in progress in
the process (streams included: each holds its connection) is answered 503 `overloaded` at once,
with `connection: close`, and nothing of it is read. An ASGI app sees requests, not
connections: idle keep-alive connections and heads still arriving are the server's to count.

`BodyLimit`, the body's size:

- A declared Content-Length over the limit is answered 413 at once, before any of the body is
  read (and before uvicorn sends a `100 Continue`, so a client that waits for one sends none).
- A body without a declared length (chunked) is counted as it arrives: the app gets it message
  by message until the count passes the limit; then the app is told the client has gone (an
  `http.disconnect`, on which Django's handler stops reading and answers nothing) and the
  wrapper answers 413. The message that passed the limit is never
  handed on, so Django spools at most the limit.

The 413 is sent first, then the rest of the body is read and thrown away, up to
LINGER_BODY_FACTOR x the limit in all and for LINGER_SECONDS at most (nginx's lingering close),
and only then is the response ended, with `connection: close`. Closing with the client's
bytes unread makes the kernel reset the connection, and a client that sends its whole body
before reading (urllib, curl, most SDKs) would see the reset and never the 413.

`BodyLimit`, the body's deadline: the whole body must have arrived (the message without
`more_body`) within GATEWAY_BODY_TIMEOUT_SECONDS of the request reaching the app, however it
trickles. Past it, a receive() still waiting is interrupted, the app is told the client has gone,
as above (so the completion pipeline, which starts only on a whole body, places no hold), and
the wrapper answers 408 with `connection: close`, without reading more of a body that is slow by
definition. The deadlines are kept by one `_Watch` per event loop, with one timer at the
earliest deadline, left armed when the bodies it was armed for end: a body that arrives at once
costs a dict entry, and no task or timer of its own.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection
from typing import Any

import orjson
from django.conf import settings

from billing import metrics
from gateway.errors import ANTHROPIC, GatewayError, error_body, style_for_path, too_large
from gateway.http import request_id_new

# A refused body is read and thrown away up to this many times the limit, for this long at most.
LINGER_BODY_FACTOR = 4
LINGER_SECONDS = 30.0

_DISCONNECT = {"type": "http.disconnect"}
# A deadline this close is as good as passed: uvloop's timers fire to the millisecond, and one
# that fired a little early must not re-arm itself over and over until the clock catches up.
TIMER_SLACK_SECONDS = 0.001


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


def overloaded() -> GatewayError:
    return GatewayError(
        503,
        "The gateway has too many requests in progress; retry shortly.",
        "server_error",
        "overloaded",
    )


def body_too_slow() -> GatewayError:
    return GatewayError(
        408,
        f"The request body did not arrive within {settings.GATEWAY_BODY_TIMEOUT_SECONDS:g} "
        "seconds.",
        "invalid_request_error",
        "request_timeout",
    )


def _error_start(path: str, error: GatewayError, *, close: bool) -> tuple[dict[str, Any], bytes]:
    """The response start and body of `error` in the path's provider shape."""
    style = style_for_path(path)
    shaped: dict[str, Any] = error_body(error, style)
    if style == ANTHROPIC and error.status == 408:
        # Anthropic names its other 4xx invalid_request_error (gateway/errors.py has no 408).
        shaped["error"]["type"] = "invalid_request_error"
    body = orjson.dumps(shaped)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id_new().encode()),
        (b"x-content-type-options", b"nosniff"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return {"type": "http.response.start", "status": error.status, "headers": headers}, body


def _refusal_counted(path: str, routes: frozenset[str], status: int, elapsed: float) -> None:
    """Request metrics of a refusal; a path not in `routes` is "unmatched",
    as Django's resolver has not run."""
    route = path[1:] if path in routes else "unmatched"
    metrics.REQUESTS.labels(route, str(status)).inc()
    metrics.REQUEST_LATENCY.labels(route).observe(elapsed)


class OpenRequestLimit:
    """ASGI middleware: at most GATEWAY_MAX_OPEN_REQUESTS requests in `app` at once (module
    docstring). The process's one event loop is the only one counting: no lock."""

    def __init__(self, app: Any, *, routes: Collection[str] = ()) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.open = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.open >= settings.GATEWAY_MAX_OPEN_REQUESTS:
            path = scope.get("path", "")
            _refusal_counted(path, self.routes, 503, 0.0)
            start, body = _error_start(path, overloaded(), close=True)
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        self.open += 1
        counted = True

        def done() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.open -= 1

        async def counted_send(message: dict[str, Any]) -> None:
            await send(message)
            # A request whose response has ended is no longer in progress, though the app may
            # still be finishing (Django's handler closes the response and sends its signal).
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done()

        try:
            await self.app(scope, receive, counted_send)
        finally:
            done()


class _Read:
    """A body being read: its deadline, and while a receive() waits for it, the waiting task."""

    __slots__ = ("deadline", "expired", "interrupted", "waiting")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False
        self.interrupted = False  # the waiting task was cancelled for the deadline
        self.waiting: asyncio.Task[Any] | None = None

    def expire(self) -> None:
        self.expired = True
        if self.waiting is not None:
            self.interrupted = True
            self.waiting.cancel()


class _Watch:
    """The bodies being read on one event loop, and one timer, at the earliest deadline of the
    reads it has seen. A read that ends does not disarm it: when it fires, it expires the reads
    past their deadline and re-arms itself at the earliest of the rest, if any. So traffic arms
    a timer about once per timeout, not once per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reads: dict[_Read, None] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    def add(self, read: _Read) -> None:
        self.reads[read] = None
        if read.deadline < self.timer_at:
            self._arm(read.deadline)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._fire)
        self.timer_at = when

    def _fire(self) -> None:
        self.timer, self.timer_at = None, math.inf
        now = self.loop.time() + TIMER_SLACK_SECONDS
        earliest = math.inf
        for read in list(self.reads):
            if read.deadline <= now:
                del self.reads[read]
                read.expire()
            else:
                earliest = min(earliest, read.deadline)
        if earliest < math.inf:
            self._arm(earliest)


class BodyLimit:
    """ASGI middleware: no body over GATEWAY_MAX_BODY_BYTES reaches `app`, and none is waited
    for longer than GATEWAY_BODY_TIMEOUT_SECONDS (module docstring).

    `routes` are the paths the request metrics name by themselves (the completion endpoints);
    a refusal on any other path is counted as "unmatched", as Django's resolver has not run.
    """

    def __init__(self, app: Any, *, routes: Collection[str] = ()) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self._watch: _Watch | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = settings.GATEWAY_MAX_BODY_BYTES
        declared = _declared_length(scope.get("headers", ()))
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, limit=limit, received=0, elapsed=0.0)
            return
        loop = asyncio.get_running_loop()
        watch = self._watch
        if watch is None or watch.loop is not loop:
            watch = self._watch = _Watch(loop)
        started = loop.time()
        read = _Read(started + settings.GATEWAY_BODY_TIMEOUT_SECONDS)
        reads = watch.reads
        watch.add(read)
        received = 0
        ended = False  # the app was handed the body's last message, or the client left
        # 413 (the body passed the limit) or 408 (it missed its deadline): the app was told the
        # client left, and the answer is this wrapper's.
        refused = 0
        answered = False  # the app started a response (watched for a counted body only)

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, ended, refused
            if refused:
                return _DISCONNECT
            if ended:
                return await receive()  # past the body (Django's disconnect listener)
            if read.expired:
                refused = 408
                return _DISCONNECT
            task = asyncio.current_task()
            assert task is not None
            read.waiting = task
            try:
                message: dict[str, Any] = await receive()
            except asyncio.CancelledError:
                # The watch's cancellation and no other (a server's shutdown, say, still
                # cancels the request): the client is late.
                if read.interrupted and task.uncancel() == 0:
                    refused = 408
                    return _DISCONNECT
                raise
            finally:
                read.waiting = None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if received > limit:
                    refused = 413
                    reads.pop(read, None)
                    return _DISCONNECT
            else:
                ended = True  # the client left
            if ended:
                reads.pop(read, None)
            return message

        app_send = send
        if declared is None:
            # A declared length is never passed (the server delivers no more), so only a
            # counted body's answers need watching. An app told that the client left answers
            # nothing (Django's handler returns), so a 408 never follows
            # an answer of the app's either.
            async def watched_send(message: dict[str, Any]) -> None:
                nonlocal answered
                if refused and not answered:
                    return  # the app was told the client left: the answer is this wrapper's
                answered = True
                await send(message)

            app_send = watched_send

        try:
            await self.app(scope, limited_receive, app_send)
        finally:
            reads.pop(read, None)
        if not refused or answered:
            return
        elapsed = loop.time() - started
        if refused == 413:
            await self._refuse(
                scope, receive, send, limit=limit, received=received, elapsed=elapsed, ended=ended
            )
            return
        path = scope.get("path", "")
        _refusal_counted(path, self.routes, 408, elapsed)
        start, body = _error_start(path, body_too_slow(), close=True)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def _refuse(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        *,
        limit: int,
        received: int,
        elapsed: float,
        ended: bool = False,
    ) -> None:
        path = scope.get("path", "")
        _refusal_counted(path, self.routes, 413, elapsed)
        # What is left of the body is not read to its end: the connection cannot be reused.
        start, body = _error_start(path, too_large(), close=not ended)
        await send(start)
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
