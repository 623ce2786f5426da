"""config/asgi.py: Django's own ASGI handler serves all of /v1/, completions included, through
the URLconf, behind the gateway's limits; called in-process as uvicorn calls it. (End to end
through uvicorn, every other gateway test uses it.)"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncGenerator
from typing import Any

import pytest
import sentry_sdk
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished, request_started

from config.asgi import application
from gateway import views
from gateway.auth import ApiKeyAuthentication
from gateway.errors import GatewayError
from gateway.http import StreamAnswer
from tests.asgi import asgi_call, http_scope

CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


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


@pytest.fixture
def any_key_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The completion views authenticate every request (with a stand-in key): these tests are
    about what happens after."""
    stand_in = object()
    monkeypatch.setattr(ApiKeyAuthentication, "cached_key", staticmethod(lambda request: stand_in))
    monkeypatch.setattr(
        ApiKeyAuthentication, "authenticate", lambda self, request: (None, stand_in)
    )


@pytest.mark.parametrize(
    ("path", "error_type"),
    [("/v1/chat/completions", "invalid_request_error"), ("/v1/messages", "authentication_error")],
)
def test_completions_are_served_by_djangos_handler_with_the_gateways_framing(
    signals_seen: list[tuple[str, Any]], path: str, error_type: str
) -> None:
    status, headers, body, body_length = asyncio.run(asgi_call("POST", path, b"{}"))

    # Provider-shaped error from DRF's exception handler, request id from the middleware.
    assert status == 401
    assert headers["x-request-id"].startswith("req_")
    assert headers["www-authenticate"] == "Bearer"
    assert body["error"]["type"] == error_type
    # Django's own handler, its request signals included (they give a request thread's
    # connections back to the pool).
    assert signals_seen == [("started", ASGIHandler), ("finished", ASGIHandler)]
    # A whole body, with its length: the server need not chunk it.
    assert int(headers["content-length"]) == body_length
    # None of the admin's middleware ran: no session cookie, no clickjacking header.
    assert "set-cookie" not in headers and "x-frame-options" not in headers


def test_the_site_keeps_its_middleware() -> None:
    status, headers, *_ = asyncio.run(asgi_call("GET", "/healthz"))

    assert status == 200
    assert headers["x-frame-options"] == "DENY"
    assert "x-request-id" not in headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_completion_endpoint_refuses_other_methods(path: str) -> None:
    status, headers, body, _ = asyncio.run(asgi_call("GET", path))

    assert status == 405
    assert headers["allow"] == "POST"
    assert headers["x-request-id"].startswith("req_")
    # A client error in either provider's shape (Anthropic's said api_error, a server fault).
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/nothing-here", {"type": "invalid_request_error", "code": "unknown_url"}),
        ("/v1/messages/nothing-here", {"type": "not_found_error"}),
    ],
)
def test_an_unknown_path_under_v1_is_a_provider_shaped_404(
    path: str, expected: dict[str, str]
) -> None:
    status, headers, body, _ = asyncio.run(asgi_call("POST", path, b"{}"))

    assert status == 404
    assert headers["x-request-id"].startswith("req_")
    assert expected.items() <= body["error"].items()


def test_a_body_over_the_limit_is_refused_declared_or_sent(settings: Any) -> None:
    settings.GATEWAY_MAX_BODY_BYTES = 100
    declared = ((b"content-length", b"101"),)
    cases = [
        asgi_call("POST", "/v1/messages", b"{}", declared),
        asgi_call("POST", "/v1/messages", [b"x" * 60] * 2),
    ]
    for case in cases:
        status, headers, body, _ = asyncio.run(case)
        assert status == 413
        assert body == {
            "type": "error",
            "error": {
                "type": "request_too_large",
                "message": "The request body exceeds 100 bytes.",
            },
        }
        assert headers["x-request-id"].startswith("req_")
    # At the limit, the body is read whole (and the request then fails on its missing key).
    at_limit = [b"{" + b" " * 49, b" " * 49 + b"}"]
    status, *_ = asyncio.run(asgi_call("POST", "/v1/messages", at_limit))
    assert status == 401


def _asgi_channel(
    messages: list[dict[str, Any]], client_left: asyncio.Event
) -> tuple[Any, Any, list[dict[str, Any]]]:
    """receive (these messages, then a disconnect once `client_left` is set), send, and sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await client_left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return receive, send, sent


def test_a_client_that_leaves_mid_body_gets_nothing(
    monkeypatch: pytest.MonkeyPatch, any_key_accepted: None
) -> None:
    asked: list[Any] = []
    monkeypatch.setattr(views, "pipeline_run", lambda **kwargs: asked.append(kwargs))
    client_left = asyncio.Event()
    client_left.set()
    request = [{"type": "http.request", "body": b'{"model":', "more_body": True}]
    receive, send, sent = _asgi_channel(request, client_left)

    asyncio.run(application(http_scope("/v1/chat/completions"), receive, send))

    assert (asked, sent) == ([], [])


def test_a_client_that_leaves_cancels_its_answer_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch, any_key_accepted: None
) -> None:
    """The client's leaving cancels the pipeline (which settles or releases what it held);
    the handler then ends normally, as uvicorn expects. A cancellation from elsewhere (the
    server stopping) still propagates."""
    seen: list[str] = []
    # Set once the pipeline is answering (one per run: an Event belongs to its loop).
    answering_started: list[asyncio.Event] = []

    async def answering(**kwargs: Any) -> Any:
        answering_started[-1].set()
        try:
            await asyncio.Event().wait()  # an answer that never comes
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    monkeypatch.setattr(views, "pipeline_run", answering)
    scope = http_scope("/v1/chat/completions")

    async def client_leaves() -> tuple[list[dict[str, Any]], int]:
        answering_started.append(asyncio.Event())
        request = [{"type": "http.request", "body": CHAT, "more_body": False}]
        # The client leaves once its request is being answered.
        receive, send, sent = _asgi_channel(request, answering_started[-1])
        await application(scope, receive, send)
        task = asyncio.current_task()
        assert task is not None
        return sent, task.cancelling()

    async def server_stops() -> None:
        answering_started.append(asyncio.Event())
        request = [{"type": "http.request", "body": CHAT, "more_body": False}]
        receive, send, _ = _asgi_channel(request, asyncio.Event())
        serving = asyncio.create_task(application(scope, receive, send))
        await answering_started[-1].wait()
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving

    assert asyncio.run(client_leaves()) == ([], 0)
    assert seen == ["cancelled"]
    asyncio.run(server_stops())
    assert seen == ["cancelled", "cancelled"]


@pytest.mark.parametrize("sentry", [False, True], ids=["sentry_off", "sentry_on"])
def test_a_completion_request_is_freed_when_it_ends(
    sentry: bool,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    any_key_accepted: None,
) -> None:
    """Without the cyclic GC: an exception kept per request ties the request into a reference
    cycle that only the GC's oldest generation frees, in pauses of tens of milliseconds under
    load."""
    if sentry:
        request.getfixturevalue("sentry_events")
    served: list[weakref.ref[Any]] = []

    async def refusing(**kwargs: Any) -> Any:
        served.append(weakref.ref(kwargs["request"]))
        raise GatewayError(402, "No credit.", "insufficient_quota", "insufficient_quota")

    monkeypatch.setattr(views, "pipeline_run", refusing)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            status, *_ = asyncio.run(asgi_call("POST", "/v1/chat/completions", CHAT))
            assert status == 402  # an error answer: the exception handler ran too
        assert len(served) == 2
        assert [ref() for ref in served] == [None, None]
    finally:
        gc.enable()


def test_an_error_event_carries_its_own_request_only(
    sentry_events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, any_key_accepted: None
) -> None:
    """Each request has its own Sentry scope (Sentry's Django integration): its error events
    say which request failed, and nothing of it stays on the process's scope once it has
    ended."""

    async def failing(**kwargs: Any) -> Any:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(views, "pipeline_run", failing)
    status, _, body, _ = asyncio.run(asgi_call("POST", "/v1/chat/completions", CHAT))
    sentry_sdk.capture_message("after the request")

    assert (status, body["error"]["code"]) == (500, "internal_error")
    requests = [event.get("request") for event in sentry_events]
    assert len(requests) == 2 and requests[1] is None
    assert requests[0] is not None
    assert (requests[0]["method"], requests[0]["url"]) == (
        "POST",
        "http://testserver/v1/chat/completions",
    )


def test_a_stream_the_client_leaves_mid_send_is_closed_before_the_request_ends(
    monkeypatch: pytest.MonkeyPatch, any_key_accepted: None
) -> None:
    """Django's handler stops iterating a stream whose send the client's leaving interrupted,
    without closing it; the response's close does (ClosingStream), so the pipeline's relay
    settles what it sent before the request ends, not whenever the generator is collected."""
    events: list[str] = []

    async def relay() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        finally:
            events.append("relay closed")

    async def streaming(**kwargs: Any) -> Any:
        return StreamAnswer(relay(), content_type="text/event-stream")

    monkeypatch.setattr(views, "pipeline_run", streaming)

    async def run() -> None:
        client_left = asyncio.Event()
        requests = [{"type": "http.request", "body": CHAT, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await client_left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message.get("body") == b"data: 1\n\n":
                client_left.set()  # the client leaves while this chunk is being sent
                await asyncio.Event().wait()

        await application(http_scope("/v1/chat/completions"), receive, send)
        events.append("request ended")

    asyncio.run(run())
    assert events == ["relay closed", "request ended"]
