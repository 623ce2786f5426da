"""The gateway's two ASGI apps for /v1/ (config/asgi.py picks by path).

- `CompletionApp` serves the completion endpoints, /v1/chat/completions and /v1/messages: it
  reads the request off the wire, hands it to the one pipeline (gateway/pipeline.py) and sends
  the pipeline's answer, without Django's request handling. Those two endpoints are the
  gateway's whole hot path, and they used none of it: no session, cookie, CSRF or user, no URL
  to resolve, no middleware but the gateway's own framing, no request thread (their database
  work runs on the pipeline's async connections or its own threads), and no request signals
  (their receivers close a request thread's connections, which these requests never open).
  Django's request and response objects, its URL resolver and middleware chain were still a
  tenth of the gateway's CPU per request.
- `GatewayASGIHandler` serves the rest of /v1/ (the sync DRF read views, 404s): Django's
  handling with the gateway's one middleware (API clients carry keys, not sessions, cookies or
  CSRF tokens, so the admin's middleware has nothing to do for them), signals included, so a
  read view's connection goes back to the pool. Django gives every request a thread for its
  thread-sensitive work, created and joined per request; this handler lends each request a
  reusable one from a free list instead (asgiref allows an executor to be reused by later
  blocks, never shared by two at once).

Neither enforces the body limit: gateway/limits.py's BodyLimit stands in front of both
(config/asgi.py), so neither is handed more than GATEWAY_MAX_BODY_BYTES of a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sentry_sdk
from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from sentry_sdk.integrations.django import DjangoIntegration
from sentry_sdk.types import Event, Hint

from billing import metrics
from gateway.errors import STATUS_ERRORS, gateway_error
from gateway.http import (
    CompletionRequest,
    JsonAnswer,
    StreamAnswer,
    error_answer,
    request_id_new,
)
from gateway.middleware import GatewayMiddleware
from gateway.pipeline import pipeline_run
from gateway.upstreams.anthropic import AnthropicMessages
from gateway.upstreams.base import Adapter
from gateway.upstreams.openai import OpenAIChat

# Idle request threads kept for reuse; a burst beyond this creates (and later drops) more.
IDLE_REQUEST_THREADS = 64


class _GatewayMiddlewareOnly(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        # The same chain BaseHandler.load_middleware builds, for this one async middleware.
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        get_response: Any = convert_exception_to_response(
            self._get_response_async  # type: ignore[attr-defined]
        )
        framing = GatewayMiddleware(get_response)
        self._exception_middleware = [framing.process_exception]
        self._middleware_chain = convert_exception_to_response(framing)


class GatewayASGIHandler(_GatewayMiddlewareOnly):
    def __init__(self) -> None:
        super().__init__()
        self._idle_threads: list[ThreadPoolExecutor] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # Only the event loop's thread touches the free list: no lock needed.
        thread = (
            self._idle_threads.pop()
            if self._idle_threads
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-request")
        )
        try:
            # Django's own (inner) ThreadSensitiveContext then reuses this one.
            async with ThreadSensitiveContext(executor=thread):
                await super().__call__(scope, receive, send)
        finally:
            if len(self._idle_threads) < IDLE_REQUEST_THREADS:
                self._idle_threads.append(thread)
            else:
                thread.shutdown(wait=False)


async def _cancel_when_gone(receive: Any, answering: asyncio.Task[Any]) -> None:
    """Cancel `answering` once the client has gone (uvicorn also says so once the response is
    sent: by then this watcher has been cancelled). Nothing else follows a complete body.

    (Django's listen_for_disconnect raises RequestAborted instead: the exception's traceback
    held the handler's frame, which held the task that held the exception, a cycle that kept
    each request alive until the cyclic GC's oldest generation reached it.)
    """
    while (await receive())["type"] != "http.disconnect":
        pass
    answering.cancel()


async def _body_read(receive: Any) -> bytes | None:
    """The whole request body, or None: the client left first. (BodyLimit, in front, hands on
    no more than GATEWAY_MAX_BODY_BYTES, and tells this app the client left if it sends more.)"""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _answer(request: CompletionRequest, adapter: type[Adapter]) -> JsonAnswer | StreamAnswer:
    try:
        return await pipeline_run(request=request, adapter=adapter)
    except Exception as exc:
        # Nothing may keep the exception: its traceback holds this frame, a cycle that would
        # keep the request alive until the cyclic GC's oldest generation runs.
        return error_answer(gateway_error(exc), adapter.style)


def _response_start(
    status: int, content_type: str, headers: dict[str, str], *, request_id: str
) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type.encode()),
            (b"x-request-id", request_id.encode()),
            (b"x-content-type-options", b"nosniff"),
            *((name.encode(), value.encode()) for name, value in headers.items()),
        ],
    }


async def _answer_send(answer: JsonAnswer | StreamAnswer, send: Any, *, request_id: str) -> None:
    if isinstance(answer, JsonAnswer):
        body = answer.body()
        # With a length the server sends the body as it is, not chunked.
        answer.headers["content-length"] = str(len(body))
        await send(
            _response_start(
                answer.status, "application/json", answer.headers, request_id=request_id
            )
        )
        await send({"type": "http.response.body", "body": body})
        return
    await send(_response_start(200, answer.content_type, answer.headers, request_id=request_id))
    # Closed however the loop ends: a client that leaves mid-send stops the relay, which then
    # settles what was generated.
    async with contextlib.aclosing(answer.chunks) as chunks:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _sentry_request(scope: dict[str, Any]) -> Any:
    """An event processor giving an error event its request's method and URL (no headers, no
    body: the scrubber would drop most of them anyway)."""

    def processor(event: Event, hint: Hint) -> Event:
        # Read only when an event is sent: most requests never send one.
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        url = f"{scope.get('scheme', 'http')}://{host}{scope['path']}"
        event.setdefault("request", {"method": scope["method"], "url": url})
        return event

    return processor


COMPLETION_ADAPTERS: dict[str, type[Adapter]] = {
    "/v1/chat/completions": OpenAIChat,
    "/v1/messages": AnthropicMessages,
}


class CompletionApp:
    """The ASGI app of the completion endpoints (the paths of COMPLETION_ADAPTERS)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"the gateway serves HTTP only, not {scope['type']}")
        if sentry_sdk.get_client().get_integration(DjangoIntegration) is None:
            await self.serve(scope, receive, send)
            return
        # A scope per request, as Sentry's own ASGI and Django integrations give one: what a
        # request adds to it (breadcrumbs, the request's processor) leaves with the request.
        with sentry_sdk.isolation_scope() as sentry_scope:
            sentry_scope.add_event_processor(_sentry_request(scope))
            await self.serve(scope, receive, send)

    async def serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = time.monotonic()
        path = scope["path"]
        adapter = COMPLETION_ADAPTERS[path]
        request_id = request_id_new()
        if scope["method"] != "POST":
            refusal = error_answer(STATUS_ERRORS[405], adapter.style)
            refusal.headers["allow"] = "POST"
            await _reply(refusal, send, path=path, request_id=request_id, started=started)
            return
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        body = await _body_read(receive)
        if body is None:
            return  # the client left before it finished asking
        request = CompletionRequest(request_id=request_id, body=body, headers=headers)

        # Answer in this task, unless the client leaves first: then the watcher cancels it,
        # and the pipeline settles or releases what it held.
        answering = asyncio.current_task()
        assert answering is not None
        watcher = asyncio.create_task(_cancel_when_gone(receive, answering))
        try:
            answer = await _answer(request, adapter)
            await _reply(answer, send, path=path, request_id=request_id, started=started)
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # not the client's leaving: the server is stopping
            answering.uncancel()
        finally:
            watcher.cancel()


async def _reply(
    answer: JsonAnswer | StreamAnswer, send: Any, *, path: str, request_id: str, started: float
) -> None:
    route = path[1:]  # as Django's resolver would name it: "v1/chat/completions"
    status = answer.status if isinstance(answer, JsonAnswer) else 200
    metrics.REQUESTS.labels(route, str(status)).inc()
    # Until the answer is ready; a stream's whole duration is its own metric.
    metrics.REQUEST_LATENCY.labels(route).observe(time.monotonic() - started)
    await _answer_send(answer, send, request_id=request_id)
