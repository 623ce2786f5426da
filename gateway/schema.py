"""How /v1/ appears in its OpenAPI schema (drf-spectacular, GET /v1/openapi.json): the two ways
of sending the key, the error shapes, and the completion views' bodies. A new view gets in by
its serializers and `extend_schema(responses=gateway_responses(...))` (docs/architecture.md)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse

from gateway.errors import ANTHROPIC, OPENAI, style_for_path
from gateway.serializers import (
    AnthropicErrorSerializer,
    OpenAIErrorSerializer,
    ServerSentEventSerializer,
)

# What every /v1/ endpoint with a key can answer besides its own statuses: no or a bad key,
# the body limit and deadline (gateway/limits.py), too many requests in progress, the database
# out of reach.
COMMON_ERRORS = (401, 408, 413, 503)
# And a completion endpoint: bad input, no credit, a budget or an inactive account, an unknown
# model, a request id replayed with another body, a body that is not JSON, the upstream's
# refusals and failures.
COMPLETION_ERRORS = (400, 402, 403, 404, 409, 415, 429, 502, 504)

# `start` and `end` of a query over UTC days (gateway/views.py's usage_days reads them).
DAY_RANGE_PARAMETERS = [
    OpenApiParameter("start", OpenApiTypes.DATE, description="First UTC day (30 days ago)."),
    OpenApiParameter("end", OpenApiTypes.DATE, description="Last UTC day, included (today)."),
]

_ERRORS = {OPENAI: OpenAIErrorSerializer, ANTHROPIC: AnthropicErrorSerializer}


def gateway_responses(
    ok: Any, *, errors: tuple[int, ...] = (400,), style: str = OPENAI
) -> dict[Any, Any]:
    """extend_schema's `responses`: `ok` for 200 (a serializer, or a dict of status or
    (status, media type) to one), and the provider-shaped error for `errors` and
    COMMON_ERRORS."""
    shaped = OpenApiResponse(_ERRORS[style], description="A provider-shaped error.")
    answers: dict[Any, Any] = ok if isinstance(ok, dict) else {200: ok}
    return {**answers, **{status: shaped for status in sorted({*errors, *COMMON_ERRORS})}}


def v1_endpoints_only(endpoints: list[Any], **kwargs: Any) -> list[Any]:
    """SPECTACULAR_SETTINGS' preprocessing hook: the schema is the API's, /v1/ (not the
    providers' webhooks)."""
    return [endpoint for endpoint in endpoints if endpoint[0].startswith("/v1/")]


def with_gateway_errors(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """SPECTACULAR_SETTINGS' postprocessing hook: every /v1/ operation documents the errors any
    of them can answer (COMMON_ERRORS, and 400 for a bad parameter or body), in its path's
    provider shape, besides what its view documents."""
    schemas = result.get("components", {}).get("schemas", {})
    for path, operations in result.get("paths", {}).items():
        name = "AnthropicError" if style_for_path(path) == ANTHROPIC else "OpenAIError"
        if name not in schemas:
            continue
        shaped = {
            "description": "A provider-shaped error.",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status in (400, *COMMON_ERRORS):
                responses.setdefault(str(status), shaped)
    return result


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """gateway.auth.ApiKeyAuthentication: either header will do."""

    target_class = "gateway.auth.ApiKeyAuthentication"
    name = ["bearerAuth", "apiKeyAuth"]

    def get_security_requirement(self, auto_schema: AutoSchema) -> list[dict[str, list[Any]]]:
        return [{"bearerAuth": []}, {"apiKeyAuth": []}]  # one or the other

    def get_security_definition(self, auto_schema: AutoSchema) -> list[dict[str, Any]]:
        return [
            {
                "type": "http",
                "scheme": "bearer",
                "description": "Authorization: Bearer <key>, as the openai SDK sends it.",
            },
            {
                "type": "apiKey",
                "in": "header",
                "name": "x-api-key",
                "description": "x-api-key: <key>, as the anthropic SDK sends it.",
            },
        ]


class CompletionSchema(AutoSchema):
    """A completion view's operation: its request serializer's body, and as the answer its
    response serializer's JSON or, when the body asks for `stream`, an event stream."""

    def get_examples(self) -> list[Any]:
        view: Any = self.view
        return list(view.serializer_class.examples)

    def get_response_serializers(self) -> Any:
        view: Any = self.view
        return gateway_responses(
            {
                (200, "application/json"): view.response_serializer,
                (200, "text/event-stream"): OpenApiResponse(
                    ServerSentEventSerializer,
                    description="Server-sent events, when the request has stream: true.",
                ),
            },
            errors=COMPLETION_ERRORS,
            style=view.adapter.style,
        )
