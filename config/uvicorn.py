"""uvicorn's HTTP/1.1 protocol (httptools, uvicorn's default) with the two limits on a request's
head that uvicorn lacks and an ASGI app cannot enforce, as it sees no request before its head is
complete:

- a deadline, GATEWAY_HEADER_TIMEOUT_SECONDS: a request's head must be complete within it of the
  connection being accepted, or of the previous response's end on a kept-alive connection (which
  also covers the rest of a body the app answered without reading); past it the connection is
  closed. uvicorn (0.55) times nothing before a head is complete: its --timeout-keep-alive is
  armed only once a response has ended and is disarmed by any byte of the next head, so a client
  that connects and sends a head a byte at a time, or nothing, holds its connection for ever;
- a size cap, GATEWAY_MAX_HEADER_BYTES: a head still incomplete after more than this many bytes
  is answered 431 and the connection closed (checked per read, so a head that completes within
  one read of up to 256 KiB passes). httptools buffers a head of any size (h11's 16 KiB
  default, --h11-max-incomplete-event-size, applies under `--http h11` only).

Select it with `uvicorn config.asgi:application --http config.uvicorn:GatewayHTTPProtocol` (or
UVICORN_HTTP=config.uvicorn:GatewayHTTPProtocol); run without it, request heads have neither
limit, and only the application's own limits hold (gateway/limits.py: the body's size and
deadline, the open-request cap). The head deadlines share one timer per event loop.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from django.conf import settings
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

# uvicorn imports this module before the app, so before Django is set up: nothing of the project
# here but settings read per connection. (As in gateway/limits.py: a deadline this close is as
# good as passed, so a timer that fires a little early does not re-arm itself over and over.)
TIMER_SLACK_SECONDS = 0.001

_TOO_LARGE = b"Request header fields too large."


class _HeadWatch:
    """The connections waiting for a request head on one event loop, with their deadlines, and
    one timer at the earliest deadline it has seen: a connection whose head arrives leaves it
    armed, and when it fires it closes the connections past their deadline and re-arms itself
    at the earliest of the rest, if any (as gateway/limits.py's body deadlines). So the deadline
    costs a request two dict operations, not a timer of its own."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[GatewayHTTPProtocol, float] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    def add(self, connection: GatewayHTTPProtocol, deadline: float) -> None:
        self.waiting[connection] = deadline
        if deadline < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(deadline, self._fire)
            self.timer_at = deadline

    def _fire(self) -> None:
        self.timer, self.timer_at = None, math.inf
        now = self.loop.time() + TIMER_SLACK_SECONDS
        earliest = math.inf
        for connection, deadline in list(self.waiting.items()):
            if deadline <= now:
                del self.waiting[connection]
                connection.head_timed_out()
            else:
                earliest = min(earliest, deadline)
        if earliest < math.inf:
            self.timer = self.loop.call_at(earliest, self._fire)
            self.timer_at = earliest


_watch: _HeadWatch | None = None


def _head_watch(loop: asyncio.AbstractEventLoop) -> _HeadWatch:
    global _watch
    if _watch is None or _watch.loop is not loop:
        _watch = _HeadWatch(loop)
    return _watch


class GatewayHTTPProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Read per connection, after uvicorn has loaded the app (which configures Django).
        self.head_timeout: float = settings.GATEWAY_HEADER_TIMEOUT_SECONDS
        self.max_head_bytes: int = settings.GATEWAY_MAX_HEADER_BYTES
        self.head_watch = _head_watch(self.loop)
        self.in_head = True  # the bytes arriving are a request's head (or come before one)
        self.head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_watch.add(self, self.loop.time() + self.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_watch.waiting.pop(self, None)
        super().connection_lost(exc)

    # The per-request callbacks call HttpToolsProtocol's directly: super() costs them a third.

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(data)
        HttpToolsProtocol.data_received(self, data)
        if (
            self.in_head
            and self.head_bytes > self.max_head_bytes
            and not self.transport.is_closing()
        ):
            self.head_refuse()

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_watch.waiting.pop(self, None)
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self.in_head, self.head_bytes = True, 0

    def on_response_complete(self) -> None:
        HttpToolsProtocol.on_response_complete(self)
        # Unless a pipelined request (its head already complete) has just started.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self.head_watch.add(self, self.loop.time() + self.head_timeout)

    def head_timed_out(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def head_refuse(self) -> None:
        self.head_watch.waiting.pop(self, None)
        content = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.append(
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE)
        )
        self.transport.write(b"".join(content))
        self.transport.close()
