"""REST_FRAMEWORK's one exception handler (gateway.errors.exception_handler): whatever a view,
its serializer, permissions or throttles raise is answered in the view's provider shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.http import Http404
from rest_framework import exceptions

from gateway.errors import ANTHROPIC, OPENAI, GatewayError, exception_handler


class _View:
    def __init__(self, style: str) -> None:
        self.style = style


def _answer(exc: Exception, style: str = OPENAI) -> tuple[int, dict[str, str], Any]:
    response = exception_handler(exc, {"view": _View(style)})
    headers = {name.lower(): value for name, value in response.items()}
    return response.status_code, headers, json.loads(response.content)


@pytest.mark.parametrize(
    ("detail", "param", "message"),
    [
        ({"budget": ["Enter a number."]}, "budget", "Enter a number."),
        (
            {"messages": [{}, {"content": ["Not a string."]}]},
            "messages[1].content",
            "Not a string.",
        ),
        ({"non_field_errors": ["Pick one."]}, None, "Pick one."),
        (["Bad."], None, "Bad."),
    ],
    ids=["field", "nested_list", "non_field", "bare"],
)
def test_a_serializers_validation_error_is_a_400_naming_its_first_field(
    detail: Any, param: str | None, message: str
) -> None:
    status, _, body = _answer(exceptions.ValidationError(detail))

    assert status == 400
    assert body == {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": "invalid_value",
        }
    }


def test_a_throttle_is_a_429_with_retry_after_in_either_shape() -> None:
    status, headers, body = _answer(exceptions.Throttled(wait=2.2))
    assert (status, headers["retry-after"]) == (429, "3")
    assert body["error"]["code"] == "rate_limit_exceeded"

    status, _, body = _answer(exceptions.Throttled(wait=1), style=ANTHROPIC)
    assert (status, body["type"], body["error"]["type"]) == (429, "error", "rate_limit_error")


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (Http404(), 404, "not_found"),
        (exceptions.NotFound(), 404, "not_found"),
        (exceptions.MethodNotAllowed("GET"), 405, "method_not_allowed"),
        (exceptions.ParseError(), 400, "invalid_json"),
        (exceptions.UnsupportedMediaType("text/plain"), 415, "unsupported_media_type"),
        (exceptions.PermissionDenied(), 403, "permission_denied"),
        (RuntimeError("a bug"), 500, "internal_error"),
    ],
    ids=["django_404", "drf_404", "405", "parse", "415", "403", "bug"],
)
def test_every_exception_gets_a_provider_shaped_status(
    exc: Exception, status: int, code: str
) -> None:
    answered, _, body = _answer(exc)

    assert answered == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code


def test_an_errors_own_headers_and_the_401_challenge_are_sent() -> None:
    error = GatewayError(
        401, "Invalid API key.", "invalid_request_error", "invalid_api_key", headers={"x-a": "1"}
    )
    status, headers, body = _answer(error, style=ANTHROPIC)

    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert headers["x-a"] == "1"
    assert body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Invalid API key."},
    }
