"""Every error the gateway returns, in the calling endpoint's provider shape."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import DatabaseError
from django.http import Http404, HttpResponse
from rest_framework import exceptions

from billing.errors import (
    AccountInactive,
    ApiKeyInactive,
    BillingError,
    BudgetExceeded,
    IdempotencyConflict,
    InsufficientFunds,
    ModelNotPriced,
)

logger = logging.getLogger(__name__)

OPENAI = "openai"
ANTHROPIC = "anthropic"

# OpenAI error "type" values by status; Anthropic has its own names.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


@dataclass
class GatewayError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    # Sent with the error (a 429's retry-after, say); the view adds them to the response.
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code or self.type}: {self.message}"


def invalid_param(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", "invalid_value", param)


def error_body(error: GatewayError, style: str) -> dict[str, object]:
    if style == ANTHROPIC:
        return {
            "type": "error",
            "error": {
                "type": _ANTHROPIC_TYPES.get(error.status, "api_error"),
                "message": error.message,
            },
        }
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


# For statuses an error can have without a view choosing its words (404, 405, 413, 500).
STATUS_ERRORS = {
    404: GatewayError(404, "Unknown endpoint.", "invalid_request_error", "unknown_url"),
    405: GatewayError(405, "Method not allowed.", "invalid_request_error", "method_not_allowed"),
    413: GatewayError(
        413, "The request body is too large.", "invalid_request_error", "request_too_large"
    ),
    500: GatewayError(500, "The gateway hit an internal error.", "server_error", "internal_error"),
}


def billing_unavailable() -> GatewayError:
    """The database is out of reach: nothing was held or charged, and the client may retry."""
    return GatewayError(
        503, "Billing is temporarily unavailable; retry shortly.", "server_error", "unavailable"
    )


def too_large() -> GatewayError:
    return GatewayError(
        413,
        f"The request body exceeds {settings.GATEWAY_MAX_BODY_BYTES} bytes.",
        "invalid_request_error",
        "request_too_large",
    )


def error_response(error: GatewayError, style: str) -> HttpResponse:
    """The response of `error` in `style`, its headers included (the middleware adds the
    request id). A plain HttpResponse, not DRF's Response: nothing is left to render later."""
    response = HttpResponse(
        orjson.dumps(error_body(error, style)), status=error.status, content_type="application/json"
    )
    if error.status == 401:
        response["WWW-Authenticate"] = "Bearer"
    for name, value in error.headers.items():
        response[name] = value
    return response


def exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse:
    """DRF's exception handler for every view (REST_FRAMEWORK["EXCEPTION_HANDLER"]): any
    exception a view, its authentication, permissions or parsing raised, as the error the
    client is told, in the view's provider style (`style`: OpenAI's unless it says)."""
    style = getattr(context.get("view"), "style", OPENAI)
    return error_response(gateway_error(exc), style)


def error_from_billing(exc: BillingError) -> GatewayError:
    if isinstance(exc, ApiKeyInactive):
        return GatewayError(
            401, f"This API key is {exc.reason}.", "invalid_request_error", "invalid_api_key"
        )
    if isinstance(exc, InsufficientFunds):
        return GatewayError(
            402,
            "Insufficient credit for this request's worst-case cost.",
            "insufficient_quota",
            "insufficient_quota",
        )
    if isinstance(exc, BudgetExceeded):
        return GatewayError(
            403,
            "This API key's spend budget for the period is exhausted.",
            "budget_exceeded",
            "budget_exceeded",
        )
    if isinstance(exc, AccountInactive):
        return GatewayError(
            403, f"The account is {exc.status}.", "permission_error", "account_inactive"
        )
    if isinstance(exc, ModelNotPriced):
        return GatewayError(
            400,
            f"The model {exc.model_alias!r} has no price and cannot be billed.",
            "invalid_request_error",
            "model_not_priced",
            "model",
        )
    if isinstance(exc, IdempotencyConflict):
        return GatewayError(409, str(exc), "invalid_request_error", "idempotency_conflict")
    return GatewayError(500, "Billing failed.", "server_error", "billing_error")


def style_for_path(path: str) -> str:
    return ANTHROPIC if path.startswith("/v1/messages") else OPENAI


def gateway_error(exc: Exception) -> GatewayError:
    """What the client is told of an exception a view or the pipeline raised."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, BillingError):
        return error_from_billing(exc)
    if isinstance(exc, RequestDataTooBig):
        return too_large()
    if isinstance(exc, exceptions.ParseError):
        return GatewayError(
            400,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            "invalid_json",
        )
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return GatewayError(
            415,
            "Send the body as application/json.",
            "invalid_request_error",
            "unsupported_media_type",
        )
    if isinstance(exc, DatabaseError):
        # Pool exhausted or database down: nothing was held or charged; the client may retry.
        logger.warning("database unavailable before the hold: %s", type(exc).__name__)
        return billing_unavailable()
    if isinstance(exc, Http404):  # Django's, as DRF's own handler maps it
        return GatewayError(404, "Not found.", "invalid_request_error", "not_found")
    if isinstance(exc, PermissionDenied):
        return GatewayError(403, "Permission denied.", "permission_error", "permission_denied")
    if isinstance(exc, exceptions.MethodNotAllowed):
        return STATUS_ERRORS[405]
    if isinstance(exc, exceptions.ValidationError):
        return _invalid(exc.detail)
    if isinstance(exc, exceptions.Throttled):
        error = GatewayError(429, str(exc.detail), "rate_limit_error", "rate_limit_exceeded")
        wait = getattr(exc, "wait", None)  # seconds, or None
        if wait is not None:
            error.headers["retry-after"] = str(math.ceil(wait))
        return error
    if isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        return GatewayError(
            exc.status_code,
            str(exc.detail),
            "permission_error" if exc.status_code == 403 else "invalid_request_error",
            codes if isinstance(codes, str) else None,
        )
    logger.exception("unhandled gateway error")
    return STATUS_ERRORS[500]


def _invalid(detail: Any, path: str = "") -> GatewayError:
    """A serializer's ValidationError as one 400 naming its first invalid field, as
    `messages[0].content` or `budget`, the way the adapters name theirs."""
    if isinstance(detail, dict) and detail:
        name, inner = next(iter(detail.items()))
        if name == "non_field_errors":
            return _invalid(inner, path)
        return _invalid(inner, f"{path}.{name}" if path else str(name))
    if isinstance(detail, list) and detail:
        for index, item in enumerate(detail):
            if isinstance(item, dict) and item:  # a list serializer's errors, by position
                return _invalid(item, f"{path}[{index}]")
        return _invalid(detail[0], path)
    message = str(detail) or "Invalid value."
    return GatewayError(400, message, "invalid_request_error", "invalid_value", path or None)
