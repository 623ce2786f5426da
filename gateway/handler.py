"""Django's ASGI handlers for /v1/, with the gateway's own middleware only.

API clients carry keys, not sessions, cookies or CSRF tokens, so the admin's middleware has
nothing to do for them; under ASGI each of Django's sync middleware would also cost two thread
hops per request.

Two handlers share that one middleware (config/asgi.py picks by path):

- `CompletionASGIHandler` serves the completion endpoints, whose async views stay on the event
  loop; their database work runs on the pipeline's async connections or in its own database
  threads. Nothing of a completion request runs in a request thread, so it gets none, and Django's
  request_started and request_finished signals are not sent: their receivers close the request
  thread's database connections and caches, which a completion request never opens, and each
  send cost a thread hop. At 32 concurrent requests those hops and the threads they woke were a
  quarter of the gateway's CPU.
- `GatewayASGIHandler` serves the rest of /v1/ (the sync DRF read views, 404s): Django's
  handling, signals included, so a read view's connection goes back to the pool. Django gives
  every request a thread for its thread-sensitive work, created and joined per request; this
  handler lends each request a reusable one from a free list instead (asgiref allows an
  executor to be reused by later blocks, never shared by two at once).
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sentry_sdk
from asgiref.sync import ThreadSensitiveContext
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.urls import set_script_prefix
from sentry_sdk.integrations.django import DjangoIntegration

from gateway.middleware import GatewayMiddleware

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


async def _client_gone(receive: Any) -> None:
    """Returns once the client has gone; uvicorn also says so once the response is sent.

    Django's listen_for_disconnect raises RequestAborted instead, on every request: the
    exception's traceback holds handle()'s frame, which holds the task that holds the
    exception, and that cycle kept each request's objects (request, headers, frames) alive
    until the cyclic GC's oldest generation reached them. Nothing else follows a complete body.
    """
    while (await receive())["type"] != "http.disconnect":
        pass


class CompletionASGIHandler(_GatewayMiddlewareOnly):
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"the gateway serves HTTP only, not {scope['type']}")
        if sentry_sdk.get_client().get_integration(DjangoIntegration) is None:
            await self.handle(scope, receive, send)
            return
        # Sentry's Django integration gives each request its own scope in ASGIHandler.__call__,
        # which this handler does not call, and its create_request adds an event processor
        # holding the request to the current one: without a scope per request, every request
        # (body included) piled up on the process's, and an error event carried them all.
        with sentry_sdk.isolation_scope():
            await self.handle(scope, receive, send)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGIHandler.handle without the request signals: the same body reading, the same race
        between the response and the client's disconnect (a client that leaves cancels the
        view, whose pipeline settles or releases what it held)."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            assert error_response is not None  # Django returns one or the other
            await self.send_response(error_response, send)
            return

        async def respond() -> None:
            response = await self.run_get_response(request)
            # The views return JSON or an async stream: no file or other resource to close.
            with contextlib.suppress(asyncio.CancelledError):  # the client left mid-send
                await self.send_response(response, send)

        # The listener first: it never raises past the cancellation of the response below.
        tasks = (asyncio.create_task(_client_gone(receive)), asyncio.create_task(respond()))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                # Cancelled: the response, because the client left.
                with contextlib.suppress(asyncio.CancelledError):
                    if task.done():
                        task.result()
                    else:
                        task.cancel()
                        await task
        finally:
            body_file.close()
