"""config/asgi.py's routing between the gateway's two handlers, called in-process as uvicorn
calls them. (End to end through uvicorn, every other gateway test uses both handlers.)

Completion requests run nothing in a request thread, so they are served without Django's
request signals (whose thread hops were a quarter of the gateway's CPU at 32 concurrent
requests); the read endpoints run sync views that use the database in the request's thread, so
they keep them, and with them the connection's return to the pool."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import weakref
from typing import Any

import pytest
from django.core.signals import request_finished, request_started

from config.asgi import application
from gateway.handler import CompletionASGIHandler, GatewayASGIHandler


async def _call(method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], Any, int]:
    """(status, headers, JSON body, body length in bytes)"""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    response_done = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await response_done.wait()  # the client stays until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            response_done.set()

    await application(scope, receive, send)
    start = sent[0]
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], headers, json.loads(payload), len(payload)


@pytest.fixture
def signals_seen() -> Any:
    seen: list[tuple[str, Any]] = []

    def started(sender: Any, **_: Any) -> None:
        seen.append(("started", sender))

    def finished(sender: Any, **_: Any) -> None:
        seen.append(("finished", sender))

    request_started.connect(started)
    request_finished.connect(finished)
    yield seen
    request_started.disconnect(started)
    request_finished.disconnect(finished)


@pytest.mark.parametrize(
    ("path", "error_type"),
    [("/v1/chat/completions", "invalid_request_error"), ("/v1/messages", "authentication_error")],
)
def test_completions_are_served_without_request_signals(
    signals_seen: list[tuple[str, Any]], path: str, error_type: str
) -> None:
    status, headers, body, body_length = asyncio.run(_call("POST", path, b"{}"))

    # The gateway's framing still applies: provider-shaped error, request id.
    assert status == 401
    assert headers["x-request-id"].startswith("req_")
    assert headers["www-authenticate"] == "Bearer"
    assert body["error"]["type"] == error_type
    assert signals_seen == []
    # A whole body, with its length: the server need not chunk it.
    assert int(headers["content-length"]) == body_length


def test_read_endpoints_keep_djangos_request_signals(
    signals_seen: list[tuple[str, Any]],
) -> None:
    status, headers, body, _ = asyncio.run(_call("GET", "/v1/models"))

    assert status == 401 and headers["x-request-id"].startswith("req_")
    assert "error" in body
    assert signals_seen == [("started", GatewayASGIHandler), ("finished", GatewayASGIHandler)]
    assert not any(sender is CompletionASGIHandler for _, sender in signals_seen)


@pytest.mark.parametrize("sentry", [False, True], ids=["sentry_off", "sentry_on"])
def test_a_completion_request_is_freed_when_it_ends(
    sentry: bool,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without the cyclic GC: an exception kept per request (Django's disconnect listener
    raised one on every request; the view kept its error) ties the handler's or the view's
    frame, and with it the request, into a reference cycle that only the GC's oldest
    generation frees, in pauses of tens of milliseconds under load. With Sentry on, its
    Django integration keeps each request in an event processor on the current scope, which
    must be the request's own."""
    if sentry:
        request.getfixturevalue("sentry_events")
    served: list[weakref.ref[Any]] = []
    create_request = CompletionASGIHandler.create_request

    def recording(self: CompletionASGIHandler, scope: Any, body_file: Any) -> Any:
        asgi_request, error_response = create_request(self, scope, body_file)
        served.append(weakref.ref(asgi_request))
        return asgi_request, error_response

    monkeypatch.setattr(CompletionASGIHandler, "create_request", recording)
    # Django logs the 401 with the request attached, and the capture would keep that record.
    caplog.set_level(logging.ERROR, logger="django.request")
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            status, *_ = asyncio.run(_call("POST", "/v1/chat/completions", b"{}"))
            assert status == 401  # an error answer: the view's except path ran too
        assert len(served) == 2
        assert [ref() for ref in served] == [None, None]
    finally:
        gc.enable()
