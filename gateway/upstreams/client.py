"""The upstream HTTP client: one aiohttp session per process, SSE event reading, failures.

The session is created lazily on the running loop (the ASGI server's), never at import time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

_session: aiohttp.ClientSession | None = None
_session_loop: asyncio.AbstractEventLoop | None = None


def upstream_session() -> aiohttp.ClientSession:
    global _session, _session_loop
    loop = asyncio.get_running_loop()
    if _session is None or _session.closed or _session_loop is not loop:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
            # Relay bytes as the provider sent them; we never need to re-encode.
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            # Every customer's requests share this session: a cookie one upstream response
            # sets (a CDN's, say) must not ride along with the next customer's request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        _session_loop = loop
    return _session


@dataclass
class UpstreamFailure(Exception):
    """The upstream did not give us a usable answer."""

    kind: str  # "status", "timeout", "connection", "protocol"
    message: str
    status: int | None = None
    body: Any = None

    def __str__(self) -> str:
        return f"upstream {self.kind}: {self.message}"


class UpstreamCall:
    """An open upstream response. Read it as JSON or as a sequence of raw SSE events."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self._events: AsyncIterator[list[bytes]] | None = None

    @classmethod
    async def open(
        cls,
        *,
        url: str,
        headers: dict[str, str],
        body: dict[str, Any],
        timeout: aiohttp.ClientTimeout,
    ) -> UpstreamCall:
        try:
            response = await upstream_session().post(
                url, data=orjson.dumps(body), headers=headers, timeout=timeout
            )
        except TimeoutError as exc:
            raise UpstreamFailure("timeout", "the upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(
                "connection", f"cannot reach the upstream ({type(exc).__name__})"
            ) from exc
        if response.status >= 400:
            try:
                payload: Any = await response.json(content_type=None)
            except (aiohttp.ClientError, ValueError, TimeoutError):
                payload = None
            response.release()
            raise UpstreamFailure(
                "status", f"the upstream answered {response.status}", response.status, payload
            )
        return cls(response)

    async def read_json(self) -> dict[str, Any]:
        try:
            payload = orjson.loads(await self.response.read())
        except TimeoutError as exc:
            raise UpstreamFailure("timeout", "the upstream stopped answering") from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise UpstreamFailure(
                "protocol", f"unreadable upstream response ({type(exc).__name__})"
            ) from exc
        finally:
            self.response.release()
        if not isinstance(payload, dict):
            raise UpstreamFailure("protocol", "the upstream response is not a JSON object")
        return payload

    async def next_events(self) -> list[bytes] | None:
        """The raw SSE events that arrived together (each with its blank line), or None at the
        end. Relaying what arrived together in one write saves a send per event under load."""
        if self._events is None:
            self._events = self._read_events()
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError as exc:
            raise UpstreamFailure("timeout", "the upstream stream stalled") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(
                "connection", f"the upstream stream broke ({type(exc).__name__})"
            ) from exc

    async def _read_events(self) -> AsyncIterator[list[bytes]]:
        splitter = SSESplitter()
        async for chunk in self.response.content.iter_any():
            events = splitter.feed(chunk)
            if events:
                yield events
        rest = splitter.rest()
        if rest:
            yield rest

    def close(self) -> None:
        """Stop the upstream request (closes the connection rather than draining it)."""
        self.response.close()


class SSESplitter:
    """Cuts a byte stream into complete SSE events (CRLF or LF line ends)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        # The pending part is already normalised, but for a CR that may pair with this LF.
        parts = (self._pending + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        self._pending = parts.pop()
        return [part.lstrip(b"\n") + b"\n\n" for part in parts if part.strip(b"\n")]

    def rest(self) -> list[bytes]:
        """An unterminated last event, when the stream ends."""
        last, self._pending = self._pending.strip(b"\r\n"), b""
        return [last + b"\n\n"] if last else []


def sse_fields(event: bytes) -> tuple[str, bytes]:
    """(event name, data payload) of one raw SSE event."""
    name = ""
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
    return name, b"\n".join(data)


def sse_event(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()
