"""Django's ASGI handler for /v1/, with the gateway's own middleware only.

API clients carry keys, not sessions, cookies or CSRF tokens, so the admin's middleware has
nothing to do for them; under ASGI each of Django's sync middleware would also cost two thread
hops per request. The completion views are async: a request stays on the event loop except
for its hold and its settle, which run in the pipeline's database threads.
"""

from __future__ import annotations

from typing import Any

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

from gateway.middleware import GatewayMiddleware


class GatewayASGIHandler(ASGIHandler):
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
