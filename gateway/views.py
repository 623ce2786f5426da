"""The read endpoints: thin DRF views. (The completion endpoints are served by
gateway/handler.py's ASGI app, through the one pipeline.)"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django.http import HttpResponseBase, JsonResponse
from django.utils import timezone
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.models import ApiKey
from billing.selectors import account_balance_get, account_entries, leg_as_json, usage_totals
from gateway.auth import ApiKeyAuthentication
from gateway.errors import OPENAI, error_body, gateway_error, invalid_param
from gateway.selectors import models_for_key


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
