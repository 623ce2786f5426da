"""Thin views. The completion endpoints are async Django views handing their adapter to the one
pipeline (gateway/pipeline.py); the read endpoints are DRF views."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.utils import timezone
from django.views import View
from rest_framework import exceptions
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.errors import BillingError
from billing.models import ApiKey
from billing.selectors import account_balance_get, account_entries, leg_as_json, usage_totals
from gateway.auth import ApiKeyAuthentication
from gateway.errors import (
    OPENAI,
    GatewayError,
    error_body,
    error_from_billing,
    error_response,
    invalid_param,
)
from gateway.middleware import too_large
from gateway.pipeline import pipeline_run
from gateway.selectors import models_for_key
from gateway.upstreams.anthropic import AnthropicMessages
from gateway.upstreams.base import Adapter
from gateway.upstreams.openai import OpenAIChat

logger = logging.getLogger(__name__)


def gateway_error(exc: Exception) -> GatewayError:
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
        return GatewayError(
            503, "Billing is temporarily unavailable; retry shortly.", "server_error", "unavailable"
        )
    if isinstance(exc, exceptions.APIException):
        return GatewayError(exc.status_code, str(exc.detail), "invalid_request_error")
    logger.exception("unhandled gateway error")
    return GatewayError(500, "The gateway hit an internal error.", "server_error", "internal_error")


class GatewayView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    style = OPENAI

    def get_exception_handler(self) -> Callable[[Exception, dict[str, Any]], Response]:
        style = self.style

        def handler(exc: Exception, context: dict[str, Any]) -> Response:
            error = gateway_error(exc)
            return Response(error_body(error, style), status=error.status)

        return handler

    @property
    def api_key(self) -> ApiKey:
        return self.request.auth  # type: ignore[return-value]


class CompletionView(View):
    http_method_names = ["post"]
    adapter: type[Adapter]

    async def post(self, request: HttpRequest) -> HttpResponseBase:
        try:
            return await pipeline_run(request=request, adapter=self.adapter)
        except Exception as exc:
            # No local may keep the exception: its traceback holds this frame, a cycle that
            # would keep the request alive until the cyclic GC's oldest generation runs.
            response = error_response(gateway_error(exc), self.adapter.style)
        if response.status_code == 401:
            response["WWW-Authenticate"] = "Bearer"
        return response


class ChatCompletionsView(CompletionView):
    adapter = OpenAIChat


class MessagesView(CompletionView):
    adapter = AnthropicMessages


class ModelsView(GatewayView):
    def get(self, request: Request) -> HttpResponseBase:
        aliases = models_for_key(api_key=self.api_key, at=timezone.now())
        return JsonResponse(
            {
                "object": "list",
                "data": [
                    {"id": alias, "object": "model", "created": 0, "owned_by": "gateway"}
                    for alias in aliases
                ],
            }
        )


class BalanceView(GatewayView):
    def get(self, request: Request) -> HttpResponseBase:
        return JsonResponse(account_balance_get(account_id=self.api_key.account_id).as_json())


class LedgerPagination(CursorPagination):
    ordering = "-id"
    page_size = 50
    max_page_size = 500
    page_size_query_param = "limit"


class LedgerView(GatewayView):
    def get(self, request: Request) -> HttpResponseBase:
        paginator = LedgerPagination()
        legs = account_entries(account_id=self.api_key.account_id, limit=None)
        page = paginator.paginate_queryset(legs, request, view=self) or []
        return paginator.get_paginated_response([leg_as_json(leg) for leg in page])


def _day(request: Request, param: str, default: datetime) -> datetime:
    raw = request.query_params.get(param)
    if not raw:
        return default
    try:
        return datetime.combine(datetime.fromisoformat(raw).date(), time.min, tzinfo=UTC)
    except ValueError as exc:
        raise invalid_param(param, f"'{param}' must be a date like 2026-11-22.") from exc


class UsageView(GatewayView):
    def get(self, request: Request) -> HttpResponseBase:
        today = datetime.combine(timezone.now().date(), time.min, tzinfo=UTC)
        start = _day(request, "start", today - timedelta(days=29))
        end = _day(request, "end", today) + timedelta(days=1)  # inclusive end day
        if end <= start:
            raise invalid_param("end", "'end' must not be before 'start'.")
        totals: dict[str, Any] = usage_totals(
            account_id=self.api_key.account_id, start=start, end=end
        )
        return JsonResponse(
            {
                "account_id": self.api_key.account_id,
                "start": start.date().isoformat(),
                "end": (end - timedelta(days=1)).date().isoformat(),
                **totals,
            }
        )
