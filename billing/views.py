"""The account's own endpoints under /v1/: its keys (a key of scope `admin`:
billing.permissions.AdminScopeKey) and its requests (any of its keys). Thin DRF views over
billing/selectors.py and billing/services/keys.py, with gateway.views.GatewayView's key
authentication and provider-shaped errors. Another account's key is a 404, as no key is."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Generator, Iterator
from datetime import date, datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.exceptions import NotFound
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request

from billing.errors import ApiKeyNotFound, InvalidKeyField
from billing.models import ApiKey
from billing.permissions import AdminScopeKey
from billing.selectors import (
    account_key_get,
    account_keys,
    account_requests,
    account_requests_chunks,
)
from billing.serializers import (
    ApiKeyCreateSerializer,
    ApiKeyListSerializer,
    ApiKeySerializer,
    ApiKeyUpdateSerializer,
    IssuedApiKeySerializer,
    RequestPageSerializer,
    RequestSerializer,
)
from billing.services.keys import UNSET, api_key_issue, api_key_revoke, api_key_update
from gateway.errors import GatewayError, invalid_param
from gateway.schema import gateway_responses
from gateway.views import GatewayView, usage_days

# The services' argument names that the API calls otherwise.
_PARAMS = {"budget_limit": "budget"}


def _key_not_found(key_id: int) -> GatewayError:
    return GatewayError(
        404, f"No API key {key_id} in this account.", "invalid_request_error", "key_not_found"
    )


def _key_invalid(exc: InvalidKeyField) -> GatewayError:
    return invalid_param(_PARAMS.get(exc.field, exc.field), f"{str(exc).capitalize()}.")


def _key_json(api_key: ApiKey, *, now: datetime) -> dict[str, Any]:
    """A key as it is now, read again for its period's spend."""
    fresh = account_key_get(account_id=api_key.account_id, key_id=api_key.pk, now=now)
    return dict(ApiKeySerializer(fresh).data)


class AccountKeysView(GatewayView):
    """The account's keys: for a key of scope admin (any other gets a 403)."""

    permission_classes = [AdminScopeKey]


class KeysView(AccountKeysView):
    """The account's keys (never a secret or a hash), or a new one, whose secret `api_key` is
    in this answer only."""

    @extend_schema(
        operation_id="keys_list", responses=gateway_responses(ApiKeyListSerializer, errors=(403,))
    )
    def get(self, request: Request) -> HttpResponseBase:
        keys = account_keys(account_id=self.api_key.account_id, now=timezone.now())
        return JsonResponse({"object": "list", "data": ApiKeySerializer(keys, many=True).data})

    @extend_schema(
        operation_id="keys_create",
        request=ApiKeyCreateSerializer,
        responses=gateway_responses({201: IssuedApiKeySerializer}, errors=(400, 403)),
    )
    def post(self, request: Request) -> HttpResponseBase:
        serializer = ApiKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        given = serializer.validated_data
        now = timezone.now()
        try:
            issued = api_key_issue(
                account_id=self.api_key.account_id,
                now=now,
                name=given["name"],
                purpose=given["purpose"],
                scope=given["scope"],
                budget_limit=given.get("budget"),
                budget_period=given.get("budget_period") or "",
                rpm=given.get("rpm"),
                tpm=given.get("tpm"),
                expires_at=given.get("expires_at"),
            )
        except InvalidKeyField as exc:
            raise _key_invalid(exc) from exc
        body = _key_json(issued.api_key, now=now) | {"api_key": issued.secret}
        return JsonResponse(body, status=201)


class KeyView(AccountKeysView):
    """One of the account's keys; PATCH changes its name, budget and rate limits (null removes
    one). Another account's key is a 404."""

    @extend_schema(
        operation_id="keys_retrieve",
        responses=gateway_responses(ApiKeySerializer, errors=(403, 404)),
    )
    def get(self, request: Request, key_id: int) -> HttpResponseBase:
        api_key = account_key_get(
            account_id=self.api_key.account_id, key_id=key_id, now=timezone.now()
        )
        if api_key is None:
            raise _key_not_found(key_id)
        return JsonResponse(ApiKeySerializer(api_key).data)

    @extend_schema(
        operation_id="keys_update",
        request=ApiKeyUpdateSerializer,
        responses=gateway_responses(ApiKeySerializer, errors=(400, 403, 404)),
    )
    def patch(self, request: Request, key_id: int) -> HttpResponseBase:
        serializer = ApiKeyUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        given = serializer.validated_data
        period = given.get("budget_period", UNSET)
        try:
            api_key = api_key_update(
                key_id=key_id,
                account_id=self.api_key.account_id,
                now=timezone.now(),
                name=given.get("name", UNSET),
                budget_limit=given.get("budget", UNSET),
                budget_period="" if period is None else period,
                rpm=given.get("rpm", UNSET),
                tpm=given.get("tpm", UNSET),
            )
        except ApiKeyNotFound as exc:
            raise _key_not_found(key_id) from exc
        except InvalidKeyField as exc:
            raise _key_invalid(exc) from exc
        return JsonResponse(_key_json(api_key, now=timezone.now()))


class KeyRevokeView(AccountKeysView):
    """Revoke one of the account's keys (again: no change); the key, `status: revoked`."""

    @extend_schema(
        operation_id="keys_revoke",
        request=None,
        responses=gateway_responses(ApiKeySerializer, errors=(403, 404)),
    )
    def post(self, request: Request, key_id: int) -> HttpResponseBase:
        now = timezone.now()
        if account_key_get(account_id=self.api_key.account_id, key_id=key_id, now=now) is None:
            raise _key_not_found(key_id)
        api_key = api_key_revoke(key_id=key_id, now=now)
        return JsonResponse(_key_json(api_key, now=now))


class RequestsPagination(CursorPagination):
    ordering = ("-started_at", "-pk")
    page_size = 50
    max_page_size = 500
    page_size_query_param = "limit"

    def decode_cursor(self, request: Request) -> Cursor | None:
        """DRF's, and a position that is not a time is as invalid as an undecodable cursor
        (its 404): DRF would filter the start times by it, and the ORM raise for a 500."""
        cursor = super().decode_cursor(request)
        if cursor is not None and cursor.position is not None:
            try:
                datetime.fromisoformat(str(cursor.position))
            except ValueError:
                raise NotFound(self.invalid_cursor_message) from None
        return cursor


class CsvRenderer(BaseRenderer):
    """Lets `?format=csv` (or `Accept: text/csv`) through DRF's content negotiation; the CSV
    itself is streamed by RequestsView."""

    media_type = "text/csv"
    format = "csv"

    def render(
        self, data: Any, accepted_media_type: Any = None, renderer_context: Any = None
    ) -> bytes:
        # Never asked to: the export is streamed, and errors go out as JSON (the exception
        # handler answers with a response of its own).
        return b""


def _csv_parts(*, account_id: int, first: date, last: date) -> Generator[bytes, None, None]:
    """The CSV export, a header row of RequestSerializer's fields then one row per request,
    one chunk of requests at a time."""
    serializer = RequestSerializer()
    columns = list(serializer.fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for chunk in account_requests_chunks(account_id=account_id, first=first, last=last):
        for record in chunk:
            row = serializer.to_representation(record)
            writer.writerow({name: _csv_cell(value) for name, value in row.items()})
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode()  # the header of an empty export


def _csv_cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def _next_part(parts: Iterator[bytes]) -> bytes | None:
    return next(parts, None)


async def _on_request_thread(parts: Generator[bytes, None, None]) -> AsyncIterator[bytes]:
    """`parts` for Django's ASGI handler, which buffers a sync iterator whole: each chunk is
    read and formatted in the request's thread (thread-sensitive: its database connection is
    the one Django closes when the request ends), the event loop only sends it."""
    try:
        while (part := await sync_to_async(_next_part)(parts)) is not None:
            yield part
    finally:
        await sync_to_async(parts.close)()


class RequestsView(GatewayView):
    """The account's requests, newest first by start, in pages; with `format=csv` the whole
    range as CSV. Any of the account's keys may read them."""

    renderer_classes = [JSONRenderer, CsvRenderer]

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "start", OpenApiTypes.DATE, description="First UTC day (30 days ago)."
            ),
            OpenApiParameter(
                "end", OpenApiTypes.DATE, description="Last UTC day, included (today)."
            ),
            OpenApiParameter("cursor", str, description="The `next` or `previous` of a page."),
            OpenApiParameter("limit", int, description="Requests per page (50; at most 500)."),
            OpenApiParameter(
                "format",
                str,
                enum=["json", "csv"],
                description="csv: the whole range as CSV, one row per request (no pages).",
            ),
        ],
        responses=gateway_responses(
            {
                (200, "application/json"): RequestPageSerializer,
                (200, "text/csv"): OpenApiResponse(
                    OpenApiTypes.STR, description="A header row of the JSON field names."
                ),
            },
            errors=(400, 404),
        ),
    )
    def get(self, request: Request) -> HttpResponseBase:
        first, last = usage_days(request, today=timezone.now().date())
        account_id = self.api_key.account_id
        if request.accepted_renderer.format == "csv":
            parts = _csv_parts(account_id=account_id, first=first, last=last)
            response = StreamingHttpResponse(
                _on_request_thread(parts), content_type="text/csv; charset=utf-8"
            )
            response["Content-Disposition"] = (
                f'attachment; filename="requests-{first.isoformat()}-{last.isoformat()}.csv"'
            )
            return response
        paginator = RequestsPagination()
        records = account_requests(account_id=account_id, first=first, last=last)
        page: list[dict[str, Any]] = paginator.paginate_queryset(records, request, view=self) or []
        return paginator.get_paginated_response(RequestSerializer(page, many=True).data)
