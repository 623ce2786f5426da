"""GATEWAY_MAX_BODY_BYTES on every /v1/ path (gateway/limits.py): a body over it is refused
with a provider-shaped 413 that the client actually reads, and Django's handler (the completion
views included) is never handed more than the limit of it.

End to end against the live uvicorn (urllib and raw sockets, as clients send), and in-process
through config/asgi.py's application for what the apps behind the limit were given."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

from config.asgi import application
from gateway import limits

pytestmark = pytest.mark.timeout(120)

# A failure bound only: every answer below comes at once, or the test fails.
SOCKET_TIMEOUT_SECONDS = 20


def _too_large(path: str, limit: int) -> dict[str, Any]:
    message = f"The request body exceeds {limit} bytes."
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": "request_too_large", "message": message}}
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return socket.create_connection((parts.hostname, parts.port), timeout=SOCKET_TIMEOUT_SECONDS)


def _head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()


def _response(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """(status line, headers, body) of the first response on `sock`, read as it comes."""
    stream = sock.makefile("rb")
    status_line = stream.readline().decode("latin-1").strip()
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return status_line, headers, body


@pytest.mark.parametrize("times_the_limit", [2, 4])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_client_that_sends_its_whole_body_first_reads_its_413(
    live_gateway, path, times_the_limit
):
    """urllib sends the whole body before it reads a byte of the answer: a server that
    answers and closes with the body unread resets the connection, and the client sees the
    reset, not the 413. Up to 4 x the limit is read and thrown away first."""
    limit = settings.GATEWAY_MAX_BODY_BYTES
    request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1, the live test server
        f"{live_gateway.url}{path}",
        data=b" " * (times_the_limit * limit),
        headers={"Content-Type": "application/json"},
        method="POST",
    )

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)  # noqa: S310 - the live test server

    assert refused.value.code == 413
    assert json.loads(refused.value.read()) == _too_large(path, limit)
    assert refused.value.headers["x-request-id"].startswith("req_")


def test_a_chunked_body_over_the_limit_is_refused_before_django_reads_it(live_gateway):
    """A chunked POST to a Django-served path: the 413 comes while the body is still being
    sent (it never ends here). Django's handler reads a body to its end before any
    middleware or view runs, so the answer cannot be Django's: it never had the body."""
    limit = settings.GATEWAY_MAX_BODY_BYTES
    chunk = b" " * 65536
    with _connect(live_gateway.url) as sock:
        sock.sendall(_head("/v1/models", "Transfer-Encoding: chunked"))
        sent = 0
        while sent <= limit:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        # No last chunk: the body has not ended when the answer comes.
        status_line, headers, body = _response(sock)

    assert status_line == "HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(body) == _too_large("/v1/models", limit)
    assert headers["connection"] == "close"
    assert headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/v1/messages"])
def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(live_gateway, path):
    """Only the head is sent: the 413 comes at once, not a `100 Continue` and not a wait for
    the body (which Django's handler used to read, whatever its length, before refusing)."""
    limit = settings.GATEWAY_MAX_BODY_BYTES
    with _connect(live_gateway.url) as sock:
        sock.sendall(_head(path, f"Content-Length: {10 * limit}", "Expect: 100-continue"))
        status_line, headers, body = _response(sock)

    assert status_line == "HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(body) == _too_large(path, limit)
    assert headers["connection"] == "close"


# In-process, as uvicorn calls the application.


def _scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class _Client:
    """Sends `chunks` body messages (the last one ends the body unless `endless`), records what
    it sends and receives in order, and leaves once the response is complete."""

    def __init__(self, chunks: int, size: int, *, ends: bool = True) -> None:
        self.remaining = chunks
        self.size = size
        self.ends = ends
        self.events: list[tuple[str, Any]] = []
        self.done = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.remaining > 0:
            self.remaining -= 1
            last = self.remaining == 0 and self.ends
            self.events.append(("body", self.size))
            return {"type": "http.request", "body": b" " * self.size, "more_body": not last}
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.events.append((message["type"], message))
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.done.set()

    def response(self) -> tuple[int, dict[str, str], Any]:
        sent = [message for kind, message in self.events if kind.startswith("http.response")]
        headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
        body = b"".join(message.get("body", b"") for message in sent[1:])
        return sent[0]["status"], headers, json.loads(body)

    def body_sent(self) -> int:
        return sum(size for kind, size in self.events if kind == "body")


@pytest.fixture
def django_reads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What Django's handler (under /v1/) read of the request: body sizes and other messages."""
    read: list[Any] = []
    read_body = ASGIHandler.read_body

    async def spying(self: ASGIHandler, receive: Any) -> Any:
        async def recorded() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            is_body = message["type"] == "http.request"
            read.append(len(message.get("body", b"")) if is_body else message["type"])
            return message

        return await read_body(self, recorded)

    monkeypatch.setattr(ASGIHandler, "read_body", spying)
    return read


def test_django_is_handed_no_more_of_a_chunked_body_than_the_limit(settings, django_reads):
    settings.GATEWAY_MAX_BODY_BYTES = 100
    client = _Client(chunks=5, size=40)

    asyncio.run(application(_scope("/v1/models", []), client.receive, client.send))

    status, headers, body = client.response()
    assert (status, body) == (413, _too_large("/v1/models", 100))
    assert headers["x-request-id"].startswith("req_")
    # 80 bytes, then the client "left": the third chunk, past the limit, was never handed on.
    assert django_reads == [40, 40, "http.disconnect"]
    # The rest was read and thrown away before the response ended.
    assert client.body_sent() == 200


def test_a_refused_body_is_discarded_up_to_four_times_the_limit(settings, django_reads):
    settings.GATEWAY_MAX_BODY_BYTES = 100
    client = _Client(chunks=100, size=50, ends=False)
    declared = [(b"content-length", b"100000")]

    asyncio.run(application(_scope("/v1/models", declared), client.receive, client.send))

    status, headers, body = client.response()
    assert (status, body) == (413, _too_large("/v1/models", 100))
    assert headers["connection"] == "close"
    # The whole answer went out before the first byte of the body was read.
    kinds = [kind for kind, _ in client.events]
    assert kinds[:2] == ["http.response.start", "http.response.body"]
    assert client.body_sent() == 400 and kinds[-1] == "http.response.body"
    assert django_reads == []


def test_a_client_that_sends_no_body_is_waited_for_no_longer_than_the_linger(settings, monkeypatch):
    settings.GATEWAY_MAX_BODY_BYTES = 100
    monkeypatch.setattr(limits, "LINGER_SECONDS", 0)
    client = _Client(chunks=0, size=0, ends=False)  # sends nothing, and stays
    declared = [(b"content-length", b"101")]

    async def client_that_stays() -> dict[str, Any]:
        await asyncio.Event().wait()  # never set
        raise AssertionError("unreachable")

    asyncio.run(application(_scope("/v1/messages", declared), client_that_stays, client.send))

    status, _, body = client.response()
    assert (status, body) == (413, _too_large("/v1/messages", 100))
    assert client.done.is_set()
