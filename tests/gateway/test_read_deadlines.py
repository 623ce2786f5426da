"""Slow clients (issue 14, item 6): a body must arrive within GATEWAY_BODY_TIMEOUT_SECONDS or the
client gets a provider-shaped 408 and the connection closes, with nothing held; at most
GATEWAY_MAX_OPEN_REQUESTS /v1/ requests are in progress per process, the rest get a 503 at
once. Both are the application's (gateway/limits.py) and hold under a uvicorn run with no
flags. A request head's deadline and size cap are the server's: config/uvicorn.py's protocol.

End to end with raw sockets against live uvicorn processes, ordered by what the server sends
(a `100 Continue` says a request is inside the app); the only waits are for an answer or for
the server to close, under generous timeouts. In-process for what the apps behind were handed,
and for the hot path's cost: no task or timer per request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import pytest
from django.utils import timezone

from billing.models import Hold
from config.asgi import application
from gateway import limits, views
from tests.factories import make_account, make_key
from tests.gateway.conftest import LiveGateway, priced_models, start_gateway, stop_gateway

pytestmark = pytest.mark.timeout(120)

# Failure bounds only: every answer and close below comes well within them, or the test fails.
SOCKET_TIMEOUT_SECONDS = 20
DEADLINE_SECONDS = 1.0
# The trickle's pace: bytes keep coming, the body never ends within the deadline.
TRICKLE_EVERY_SECONDS = 0.05


# --- live gateways ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_body_gateway(
    django_db_setup, django_db_blocker, tmp_path_factory
) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    """uvicorn run with no flags; a 1 s body deadline."""
    gateway = start_gateway(
        tmp_path_factory.mktemp("slow-body") / "uvicorn.log",
        GATEWAY_BODY_TIMEOUT_SECONDS=str(DEADLINE_SECONDS),
    )
    yield gateway
    stop_gateway(gateway)


@pytest.fixture(scope="module")
def capped_gateway(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    """uvicorn run with no flags; at most 2 open /v1/ requests (the default body deadline)."""
    gateway = start_gateway(
        tmp_path_factory.mktemp("capped") / "uvicorn.log", GATEWAY_MAX_OPEN_REQUESTS="2"
    )
    yield gateway
    stop_gateway(gateway)


@pytest.fixture(scope="module")
def head_deadline_gateway(
    django_db_setup, django_db_blocker, tmp_path_factory
) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    """uvicorn with the production protocol (`--http config.uvicorn:GatewayHTTPProtocol`, here
    through uvicorn's environment variable); a 1 s head deadline, an 8 KiB head cap."""
    gateway = start_gateway(
        tmp_path_factory.mktemp("head-deadline") / "uvicorn.log",
        UVICORN_HTTP="config.uvicorn:GatewayHTTPProtocol",
        GATEWAY_HEADER_TIMEOUT_SECONDS=str(DEADLINE_SECONDS),
        GATEWAY_MAX_HEADER_BYTES="8192",
    )
    yield gateway
    stop_gateway(gateway)


@dataclass
class Customer:
    account_id: int
    key: str
    openai_model: str
    anthropic_model: str

    def body(self, path: str, content: str = "hi") -> bytes:
        model = self.anthropic_model if path == "/v1/messages" else self.openai_model
        return json.dumps(
            {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": content}]}
        ).encode()


@pytest.fixture
def customer(mock_upstream, transactional_db) -> Customer:  # type: ignore[no-untyped-def]
    openai_model, anthropic_model = priced_models(mock_upstream)
    account = make_account(credits=Decimal("10"), now=timezone.now())
    issued = make_key(account=account, now=timezone.now())
    return Customer(account.pk, issued.secret, openai_model, anthropic_model)


# --- raw HTTP/1.1 -------------------------------------------------------------------------


def _connect(gateway: LiveGateway) -> socket.socket:
    parts = urlsplit(gateway.url)
    assert parts.hostname is not None and parts.port is not None
    return socket.create_connection((parts.hostname, parts.port), timeout=SOCKET_TIMEOUT_SECONDS)


def _head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()


def _response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the next response on `stream`, read as it comes."""
    status_line = stream.readline().decode("latin-1")
    assert status_line.startswith("HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def _closed_by_server(stream: BinaryIO) -> bool:
    """Waits (SOCKET_TIMEOUT_SECONDS at most) for the server to close the connection."""
    try:
        return stream.read() == b""
    except ConnectionResetError:
        return True  # closed; the client's own late bytes made the server's kernel reset it
    except TimeoutError:
        return False


class Trickle:
    """Sends `data` a byte at a time from a thread, every TRICKLE_EVERY_SECONDS, until it is all
    sent, the connection fails or the test is done."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.sock = sock
        self.data = data
        self.sent = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for byte in self.data:
            if self.done.wait(TRICKLE_EVERY_SECONDS):  # the pace, not an ordering
                return
            try:
                self.sock.send(bytes([byte]))
            except OSError:
                return  # the server closed
            self.sent += 1

    def __enter__(self) -> Trickle:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(5)


def _timed_out(path: str) -> dict[str, Any]:
    message = f"The request body did not arrive within {DEADLINE_SECONDS:g} seconds."
    if path == "/v1/messages":
        return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }


def _overloaded(path: str) -> dict[str, Any]:
    message = "The gateway has too many requests in progress; retry shortly."
    if path == "/v1/messages":
        return {"type": "error", "error": {"type": "overloaded_error", "message": message}}
    return {
        "error": {"message": message, "type": "server_error", "param": None, "code": "overloaded"}
    }


# --- the body's deadline, with no server flags ---------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_body_that_trickles_past_the_deadline_gets_408_and_the_connection_closes(
    slow_body_gateway, customer, path
):
    """Bytes keep coming, a few a second, the body never ends: the deadline is the whole
    body's, not an idle timeout that each byte resets."""
    body = customer.body(path)
    started = time.monotonic()
    with _connect(slow_body_gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(
            _head(
                "POST",
                path,
                f"Authorization: Bearer {customer.key}",
                f"Content-Length: {len(body)}",
            )
        )
        with Trickle(sock, body) as trickle:
            status, headers, answer = _response(stream)
            elapsed = time.monotonic() - started
            assert trickle.sent < len(body)  # answered before the body ended
        assert _closed_by_server(stream)

    assert status == 408
    assert json.loads(answer) == _timed_out(path)
    assert headers["connection"] == "close"
    assert headers["x-request-id"].startswith("req_")
    assert elapsed >= DEADLINE_SECONDS  # not before the deadline
    assert trickle.sent >= 2  # the client kept sending until then
    assert not Hold.objects.filter(account_id=customer.account_id).exists()


def test_a_chunked_body_to_a_django_served_path_is_held_to_the_deadline(slow_body_gateway):
    """Django's handler reads the whole body before anything runs: it is told the client left,
    and the 408 is the limit's."""
    chunks = b"1\r\n \r\n" * 1000  # one-byte chunks, never the last one
    with _connect(slow_body_gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(_head("POST", "/v1/models", "Transfer-Encoding: chunked"))
        with Trickle(sock, chunks):
            status, headers, answer = _response(stream)
        assert _closed_by_server(stream)

    assert status == 408
    assert json.loads(answer) == _timed_out("/v1/models")
    assert headers["connection"] == "close"


def test_a_body_that_completes_after_the_deadline_places_no_hold(slow_body_gateway, customer):
    """All but the body's last byte before the deadline, the last one after the 408: nothing is
    held, while the same body sent at once is served and held (and settled)."""
    path = "/v1/chat/completions"
    body = customer.body(path)
    head = _head(
        "POST", path, f"Authorization: Bearer {customer.key}", f"Content-Length: {len(body)}"
    )
    with _connect(slow_body_gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(head + body[:-1])
        status, _, _ = _response(stream)
        with contextlib.suppress(OSError):  # the server may have closed already
            sock.sendall(body[-1:])
        assert _closed_by_server(stream)
    assert status == 408

    with _connect(slow_body_gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(head + body)
        served, headers, _ = _response(stream)

    assert served == 200, headers
    holds = Hold.objects.filter(account_id=customer.account_id)
    assert [hold.state for hold in holds] == [Hold.State.SETTLED]


def test_a_body_sent_within_the_deadline_is_served_on_a_kept_alive_connection(
    slow_body_gateway, customer
):
    path = "/v1/messages"
    body = customer.body(path)
    head = _head("POST", path, f"x-api-key: {customer.key}", f"Content-Length: {len(body)}")
    with _connect(slow_body_gateway) as sock, sock.makefile("rb") as stream:
        for _ in range(2):
            sock.sendall(head)
            for start in range(0, len(body), 16):  # in pieces, as they come
                sock.sendall(body[start : start + 16])
            status, headers, answer = _response(stream)
            assert status == 200, answer
            assert "connection" not in headers
            assert json.loads(answer)["type"] == "message"


# --- the open-request cap, with no server flags --------------------------------------------


def _inside_the_app(gateway: LiveGateway) -> tuple[socket.socket, BinaryIO]:
    """A request inside the app, waiting for its body: uvicorn sends `100 Continue` when the
    app first asks for the body, past the open-request cap."""
    sock = _connect(gateway)
    stream = sock.makefile("rb")
    sock.sendall(
        _head(
            "POST",
            "/v1/chat/completions",
            "Authorization: Bearer sk-gw-not-a-key",
            "Content-Length: 2",
            "Expect: 100-continue",
        )
    )
    assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert stream.readline() == b"\r\n"
    return sock, stream


def _ask(gateway: LiveGateway, path: str) -> tuple[int, dict[str, str], bytes]:
    with _connect(gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(
            _head("POST", path, "Authorization: Bearer sk-gw-not-a-key", "Content-Length: 2")
            + b"{}"
        )
        return _response(stream)


def test_requests_beyond_the_open_request_cap_get_503_until_one_ends(capped_gateway):
    first, first_stream = _inside_the_app(capped_gateway)
    second, second_stream = _inside_the_app(capped_gateway)
    try:
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/models"):
            status, headers, answer = _ask(capped_gateway, path)
            assert status == 503
            assert json.loads(answer) == _overloaded(path)
            assert headers["connection"] == "close"
        # Outside /v1/ nothing is counted.
        with _connect(capped_gateway) as sock, sock.makefile("rb") as stream:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _response(stream)[0] == 200

        # The first one's body arrives and it is answered: its place is free.
        first.sendall(b"{}")
        assert _response(first_stream)[0] == 401
        assert _ask(capped_gateway, "/v1/chat/completions")[0] == 401
        assert _ask(capped_gateway, "/v1/messages")[0] == 401
    finally:
        for held, held_stream in ((first, first_stream), (second, second_stream)):
            held_stream.close()
            held.close()


# --- the head's deadline and size: config/uvicorn.py's protocol ------------------------------


def test_a_head_that_trickles_past_the_deadline_is_closed(head_deadline_gateway):
    started = time.monotonic()
    with _connect(head_deadline_gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with Trickle(sock, b"X-Slow: " + b"a" * 1000):
            assert _closed_by_server(stream)
    assert time.monotonic() - started >= DEADLINE_SECONDS


def test_a_connection_that_sends_nothing_is_closed(head_deadline_gateway):
    with _connect(head_deadline_gateway) as sock, sock.makefile("rb") as stream:
        assert _closed_by_server(stream)


def test_the_next_head_on_a_kept_alive_connection_has_the_deadline_too(head_deadline_gateway):
    """uvicorn's own keep-alive timeout is disarmed by the first byte of the next head."""
    with _connect(head_deadline_gateway) as sock, sock.makefile("rb") as stream:
        for _ in range(2):  # complete heads are served, the connection kept
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, _ = _response(stream)
            assert status == 200 and "connection" not in headers
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert _closed_by_server(stream)


def test_a_completion_request_is_served_under_the_protocol(head_deadline_gateway, customer):
    path = "/v1/chat/completions"
    body = customer.body(path)
    with _connect(head_deadline_gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(
            _head(
                "POST",
                path,
                f"Authorization: Bearer {customer.key}",
                f"Content-Length: {len(body)}",
            )
            + body
        )
        status, _, answer = _response(stream)
    assert status == 200, answer
    assert json.loads(answer)["usage"]["cost"]


def test_a_pipelined_request_outliving_the_head_deadline_is_answered(
    head_deadline_gateway, customer
):
    """Two requests in one write: the second's head is complete before the first is answered,
    and its answer (the upstream takes 1.8 s) comes well past the head deadline."""
    path = "/v1/chat/completions"
    requests = b""
    for content in ("hi", "[mock:tokens=3] [mock:delay_ms=600]"):
        body = customer.body(path, content)
        requests += (
            _head(
                "POST",
                path,
                f"Authorization: Bearer {customer.key}",
                f"Content-Length: {len(body)}",
            )
            + body
        )
    with _connect(head_deadline_gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(requests)
        first, _, _ = _response(stream)
        second, _, answer = _response(stream)
    assert (first, second) == (200, 200), answer
    assert json.loads(answer)["usage"]["completion_tokens"] == 3


def test_a_head_over_the_size_cap_gets_431(head_deadline_gateway):
    with _connect(head_deadline_gateway) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for _ in range(16):  # 16 KiB of head, never ended
                sock.sendall(b"X-Big: " + b"a" * 1015 + b"\r\n")
        except OSError:
            pass  # the server refused and closed first
        status, headers, answer = _response(stream)
        assert _closed_by_server(stream)
    assert status == 431
    assert headers["connection"] == "close"
    assert answer == b"Request header fields too large."


# --- in-process, as uvicorn calls the application ---------------------------------------------


def _scope(path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
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
    """Sends `chunks` as body messages (more_body on all but the last, unless `ends` is False),
    then nothing more until the response is complete; records what it is sent."""

    def __init__(self, *chunks: bytes, ends: bool = True) -> None:
        self.chunks = list(chunks)
        self.ends = ends
        self.sent: list[dict[str, Any]] = []
        self.done = asyncio.Event()
        self.waiting = asyncio.Event()  # the app waits for more of the body

    async def receive(self) -> dict[str, Any]:
        if self.chunks:
            chunk = self.chunks.pop(0)
            return {
                "type": "http.request",
                "body": chunk,
                "more_body": bool(self.chunks) or not self.ends,
            }
        self.waiting.set()
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.done.set()

    def response(self) -> tuple[int, dict[str, str], Any]:
        headers = {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}
        body = b"".join(message.get("body", b"") for message in self.sent[1:])
        return self.sent[0]["status"], headers, json.loads(body)


class _Recording:
    """An app that reads the body, records each message, and answers 200 once it is whole."""

    def __init__(self, *, pause: float = 0.0) -> None:
        self.read: list[tuple[str, bytes]] = []
        self.pause = pause

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            self.read.append((message["type"], message.get("body", b"")))
            if message["type"] == "http.disconnect":
                return
            if not message.get("more_body", False):
                break
            if self.pause:
                await asyncio.sleep(self.pause)  # the app's own work between two reads
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize("declared", [True, False])
def test_the_app_is_told_the_client_left_when_the_body_is_late(settings, declared):
    settings.GATEWAY_BODY_TIMEOUT_SECONDS = DEADLINE_SECONDS / 20
    app = _Recording()
    client = _Client(b"{", ends=False)
    length = [(b"content-length", b"100")] if declared else []

    asyncio.run(limits.BodyLimit(app)(_scope("/v1/messages", *length), client.receive, client.send))

    assert app.read == [("http.request", b"{"), ("http.disconnect", b"")]
    status, headers, body = client.response()
    assert status == 408
    assert headers["connection"] == "close"
    message = f"The request body did not arrive within {DEADLINE_SECONDS / 20:g} seconds."
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


def test_a_body_late_while_the_app_works_between_reads_is_cut_at_the_next_read(settings):
    settings.GATEWAY_BODY_TIMEOUT_SECONDS = DEADLINE_SECONDS / 20
    app = _Recording(pause=DEADLINE_SECONDS / 5)  # past the deadline before its second read
    client = _Client(b"{", b"}")

    asyncio.run(limits.BodyLimit(app)(_scope("/v1/models"), client.receive, client.send))

    assert app.read == [("http.request", b"{"), ("http.disconnect", b"")]
    assert client.response()[0] == 408


def test_a_late_completion_body_never_reaches_the_pipeline(settings, monkeypatch):
    settings.GATEWAY_BODY_TIMEOUT_SECONDS = DEADLINE_SECONDS / 20
    called: list[Any] = []

    async def pipeline_run(**kwargs: Any) -> Any:
        called.append(kwargs)
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(views, "pipeline_run", pipeline_run)
    client = _Client(b'{"model": "m", "messages": [', ends=False)
    scope = _scope("/v1/chat/completions", (b"content-length", b"1000"))

    asyncio.run(application(scope, client.receive, client.send))

    status, _, body = client.response()
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert called == []


def test_a_cancellation_from_elsewhere_is_not_taken_for_the_deadline(settings):
    """The server cancelling a request waiting for its body (its shutdown) still cancels it:
    the limit answers nothing and swallows nothing."""
    settings.GATEWAY_BODY_TIMEOUT_SECONDS = 60
    client = _Client(b"{", ends=False)

    async def run() -> None:
        request = asyncio.ensure_future(
            limits.BodyLimit(_Recording())(_scope("/v1/messages"), client.receive, client.send)
        )
        await client.waiting.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    asyncio.run(run())
    assert client.sent == []


def test_a_body_that_arrives_at_once_costs_no_task_and_no_timer(settings, monkeypatch):
    """The deadlines share one timer per event loop, armed at the first request's deadline and
    left armed: the requests after it, each body in one message, add none, and no task."""
    settings.GATEWAY_BODY_TIMEOUT_SECONDS = 60
    stack = limits.OpenRequestLimit(limits.BodyLimit(_Recording()))
    made: list[str] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for name in ("call_at", "call_later", "call_soon", "create_task"):
            original = getattr(loop, name)

            def counted(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
                made.append(_name)
                return _original(*args, **kw)

            monkeypatch.setattr(loop, name, counted)
        for _ in range(100):
            client = _Client(b"{}")
            declared = (b"content-length", b"2")
            await stack(_scope("/v1/chat/completions", declared), client.receive, client.send)
            assert client.sent[0]["status"] == 200
        seen.extend(made)  # not what asyncio.run does on its way out

    seen: list[str] = []
    asyncio.run(run())
    assert seen == ["call_at"]  # the first request's, the one timer of the loop
    assert stack.open == 0


def test_the_open_request_count_is_released_by_a_failing_app(settings):
    settings.GATEWAY_MAX_OPEN_REQUESTS = 1

    async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    stack = limits.OpenRequestLimit(failing)
    client = _Client(b"{}")
    for _ in range(2):
        with pytest.raises(RuntimeError):
            asyncio.run(stack(_scope("/v1/messages"), client.receive, client.send))
    assert stack.open == 0
    assert client.sent == []
