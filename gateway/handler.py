"""Django's ASGI handler for /v1/, with the gateway's own middleware only.

API clients carry keys, not sessions, cookies or CSRF tokens, so the admin's middleware has
nothing to do for them; under ASGI each of Django's sync middleware would also cost two thread
hops per request. The completion views are async: a request stays on the event loop except
for its hold and its settle, which run in the pipeline's database threads.

Django gives every request a thread for its thread-sensitive work (the request_started and
request_finished signals, the sync read views), created and joined per request. This handler
lends each request a reusable one from a free list instead (asgiref allows an executor to be
reused by later blocks, never shared by two at once).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

from gateway.middleware import GatewayMiddleware

# Idle request threads kept for reuse; a burst beyond this creates (and later drops) more.
IDLE_REQUEST_THREADS = 64


class GatewayASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._idle_threads: list[ThreadPoolExecutor] = []

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
