"""The middleware of Django's one handler (settings.MIDDLEWARE), for /v1/ and the site alike.

- `GatewayMiddleware`, outermost: for a /v1/ path, a request id on every response, a
  provider-shaped JSON body for every error raised outside a view (a 404 of an unknown path, a
  500), `Content-Length` on whole bodies, and the request metrics. Other paths pass through.
- The site's middleware (sessions, CSRF, auth, messages, ... for the admin) as `site_only`
  subclasses: under /v1/ each passes the request straight on. API clients carry keys, not
  sessions, cookies or CSRF tokens, so that middleware has nothing to do for them, and under
  Django's ASGI handler each of its hooks costs a thread hop per request. The subclasses keep
  Django's own system checks (the admin's need for sessions, auth and messages) satisfied.

The body limit is enforced before Django reads a byte of the body, by gateway/limits.py's
wrappers in front of all of /v1/ (config/asgi.py).
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.contrib.auth.middleware import AuthenticationMiddleware as _Authentication
from django.contrib.messages.middleware import MessageMiddleware as _Messages
from django.contrib.sessions.middleware import SessionMiddleware as _Sessions
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware as _XFrameOptions
from django.middleware.common import CommonMiddleware as _Common
from django.middleware.csrf import CsrfViewMiddleware as _Csrf
from django.middleware.security import SecurityMiddleware as _Security
from django_prometheus.middleware import PrometheusAfterMiddleware as _PrometheusAfter
from django_prometheus.middleware import PrometheusBeforeMiddleware as _PrometheusBefore

from billing import metrics
from gateway.errors import STATUS_ERRORS, GatewayError, error_response, style_for_path
from gateway.http import request_id_new

logger = logging.getLogger(__name__)

GATEWAY_PREFIX = "/v1/"


class GatewayMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._async_call(request)
        if not request.path_info.startswith(GATEWAY_PREFIX):
            return self.get_response(request)
        started = _begin(request)
        return _framed(request, self.get_response(request), started)

    async def _async_call(self, request: HttpRequest) -> HttpResponseBase:
        if not request.path_info.startswith(GATEWAY_PREFIX):
            return await self.get_response(request)
        started = _begin(request)
        return _framed(request, await self.get_response(request), started)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponseBase | None:
        if not request.path_info.startswith(GATEWAY_PREFIX):
            return None
        logger.exception(
            "unhandled gateway error (request %s)", getattr(request, "request_id", "?")
        )
        return error_response(STATUS_ERRORS[500], style_for_path(request.path))


def _begin(request: HttpRequest) -> float:
    """The request's id and start, for the views (the pipeline's request id) and the metrics."""
    started = time.monotonic()
    request.request_id = request_id_new()  # type: ignore[attr-defined]
    request.started = started  # type: ignore[attr-defined]
    return started


def _framed(request: HttpRequest, response: HttpResponseBase, started: float) -> HttpResponseBase:
    if response.status_code >= 400 and "json" not in response.get("Content-Type", ""):
        error = STATUS_ERRORS.get(response.status_code) or GatewayError(
            response.status_code, "Request failed.", "invalid_request_error"
        )
        response = error_response(error, style_for_path(request.path))
    response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
    if isinstance(response, HttpResponse):  # a whole body, not a stream
        # As Django's CommonMiddleware does: with a length the server sends the body as it is,
        # not chunked (a write and its framing fewer per response).
        response["Content-Length"] = str(len(response.content))
    response["X-Content-Type-Options"] = "nosniff"
    match = request.resolver_match
    route = match.route if match is not None else "unmatched"
    metrics.REQUESTS.labels(route, str(response.status_code)).inc()
    # Until the response object is ready; a stream's whole duration is its own metric.
    metrics.REQUEST_LATENCY.labels(route).observe(time.monotonic() - started)
    return response


_HOOKS = ("process_view", "process_template_response", "process_exception")


def site_only(middleware: type[Any]) -> type[Any]:
    """`middleware` (a MiddlewareMixin class) for every path but /v1/: there it hands the
    request on, and its view, template-response and exception hooks return at once, without
    the thread hop Django's async handler would make to run them."""

    class SiteOnly(middleware):
        def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
            super().__init__(get_response)
            asynchronous = iscoroutinefunction(get_response)
            for hook in _HOOKS:
                method = getattr(self, hook, None)
                if method is not None:
                    setattr(self, hook, _site_hook(method, asynchronous=asynchronous))

        def __call__(self, request: HttpRequest) -> Any:
            if request.path_info.startswith(GATEWAY_PREFIX):
                return self.get_response(request)
            return super().__call__(request)

    SiteOnly.__name__ = SiteOnly.__qualname__ = middleware.__name__
    SiteOnly.__doc__ = f"{middleware.__module__}.{middleware.__name__}, but not under /v1/."
    return SiteOnly


def _site_hook(method: Callable[..., Any], *, asynchronous: bool) -> Callable[..., Any]:
    """`method`, bound like it to its middleware (Django names a hook by its `__self__`), but
    answering at once under /v1/: nothing to change (a template response: itself)."""
    passes_response = method.__name__ == "process_template_response"

    def hook(middleware: Any, request: HttpRequest, *args: Any) -> Any:
        if request.path_info.startswith(GATEWAY_PREFIX):
            return args[0] if passes_response else None
        return method(request, *args)

    if not asynchronous:
        return types.MethodType(hook, method.__self__)  # type: ignore[attr-defined]

    in_thread = sync_to_async(method, thread_sensitive=True)

    async def async_hook(middleware: Any, request: HttpRequest, *args: Any) -> Any:
        if request.path_info.startswith(GATEWAY_PREFIX):
            return args[0] if passes_response else None
        return await in_thread(request, *args)

    return types.MethodType(async_hook, method.__self__)  # type: ignore[attr-defined]


PrometheusBeforeMiddleware = site_only(_PrometheusBefore)
SecurityMiddleware = site_only(_Security)
SessionMiddleware = site_only(_Sessions)
CommonMiddleware = site_only(_Common)
CsrfViewMiddleware = site_only(_Csrf)
AuthenticationMiddleware = site_only(_Authentication)
MessageMiddleware = site_only(_Messages)
XFrameOptionsMiddleware = site_only(_XFrameOptions)
PrometheusAfterMiddleware = site_only(_PrometheusAfter)
