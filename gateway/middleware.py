"""Gateway framing for /v1/'s read endpoints (and its unknown paths): a request id on every
response, provider-shaped JSON for every error (including 404 and 500 raised outside the
views), request metrics. The completion endpoints' ASGI app frames its responses the same way
(gateway/handler.py). The body limit is enforced before Django reads a byte of the body, by
gateway/limits.py's BodyLimit in front of all of /v1/ (config/asgi.py).

Async only: it is the one middleware of the gateway's Django handler (gateway/handler.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from django.http import HttpRequest, HttpResponse, HttpResponseBase

from billing import metrics
from gateway.errors import STATUS_ERRORS, GatewayError, error_response, style_for_path
from gateway.http import request_id_new

logger = logging.getLogger(__name__)


class GatewayMiddleware:
    sync_capable = False
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]) -> None:
        self.get_response = get_response

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        started = time.monotonic()
        request_id = request_id_new()
        request.request_id = request_id  # type: ignore[attr-defined]
        style = style_for_path(request.path)
        response = await self.get_response(request)
        if response.status_code >= 400 and "json" not in response.get("Content-Type", ""):
            error = STATUS_ERRORS.get(response.status_code) or GatewayError(
                response.status_code, "Request failed.", "invalid_request_error"
            )
            response = error_response(error, style)
        response["x-request-id"] = request_id
        if isinstance(response, HttpResponse):  # a whole body, not a stream
            # As Django's CommonMiddleware does: with a length the server sends the body as it
            # is, not chunked (a write and its framing fewer per response).
            response["Content-Length"] = str(len(response.content))
        response["X-Content-Type-Options"] = "nosniff"
        match = request.resolver_match
        route = match.route if match is not None else "unmatched"
        metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        # Until the response object is ready; a stream's whole duration is its own metric.
        metrics.REQUEST_LATENCY.labels(route).observe(time.monotonic() - started)
        return response

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponseBase | None:
        logger.exception(
            "unhandled gateway error (request %s)", getattr(request, "request_id", "?")
        )
        return error_response(STATUS_ERRORS[500], style_for_path(request.path))
