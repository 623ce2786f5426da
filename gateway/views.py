"""The read endpoints: thin DRF views. (The completion endpoints are served by
gateway/handler.py's ASGI app, through the one pipeline.)"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.http import HttpResponseBase, JsonResponse
from django.utils import timezone
from rest_framework.exceptions import NotFound
from rest_framework.pagination import Cursor, CursorPagination
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

    def decode_cursor(self, request: Request) -> Cursor | None:
        """DRF's, and a position that is not an entry id is as invalid as an undecodable
        cursor (its 404): DRF would filter the ids by it, and the ORM raise for a 500."""
        cursor = super().decode_cursor(request)
        if cursor is not None and cursor.position is not None:
            try:
                int(cursor.position)
            except ValueError:
                raise NotFound(self.invalid_cursor_message) from None
        return cursor


class LedgerView(GatewayView):
    def get(self, request: Request) -> HttpResponseBase:
        paginator = LedgerPagination()
        legs = account_entries(account_id=self.api_key.account_id, limit=None)
        page = paginator.paginate_queryset(legs, request, view=self) or []
        return paginator.get_paginated_response([leg_as_json(leg) for leg in page])


def _day(request: Request, param: str) -> date | None:
    raw = request.query_params.get(param)
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw).date()
    except ValueError as exc:
        raise invalid_param(param, f"'{param}' must be a date like 2026-11-22.") from exc


def usage_days(request: Request, *, today: date) -> tuple[date, date]:
    """The first and last (inclusive) UTC days of a usage query: `start` and `end`, by default
    the 30 days to today. A range that is empty, or whose end has no following day to bound
    it by (9999-12-31), is the client's 400 naming the parameter."""
    start, end = _day(request, "start"), _day(request, "end")
    first = start or today - timedelta(days=29)
    last = end or today
    if last == date.max:
        raise invalid_param("end", f"'end' must be before {date.max.isoformat()}.")
    if first > last:
        if end is None:
            raise invalid_param("start", "'start' must not be after 'end' (today if not given).")
        raise invalid_param("end", "'end' must not be before 'start'.")
    return first, last


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


class UsageView(GatewayView):
    def get(self, request: Request) -> HttpResponseBase:
        first, last = usage_days(request, today=timezone.now().date())
        totals: dict[str, Any] = usage_totals(
            account_id=self.api_key.account_id,
            start=_midnight(first),
            end=_midnight(last + timedelta(days=1)),  # the end day is included
        )
        return JsonResponse(
            {
                "account_id": self.api_key.account_id,
                "start": first.isoformat(),
                "end": last.isoformat(),
                **totals,
            }
        )
