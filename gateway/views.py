"""The /v1/ endpoints: thin DRF views over the pipeline (completions) and the selectors
(reads). Errors of every kind come out provider-shaped through REST_FRAMEWORK's exception
handler (gateway.errors.exception_handler), in the view's `style`.

A completion endpoint is one adapter (gateway/upstreams/) and one URL line:
`path("v1/...", CompletionView.as_view(adapter=..., serializer_class=...,
response_serializer=...))` (gateway/urls.py).
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from datetime import time as day_time
from typing import Any, ClassVar, cast

from adrf.views import APIView as AsyncAPIView
from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.exceptions import MethodNotAllowed, NotFound
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.request import Request
from rest_framework.views import APIView

from billing.models import ApiKey
from billing.selectors import account_balance_get, account_entries, leg_as_json, usage_totals
from gateway.auth import ApiKeyAuthentication
from gateway.errors import OPENAI, invalid_param
from gateway.http import (
    CompletionRequest,
    MetaHeaders,
    answer_response,
    request_id_new,
    request_json,
)
from gateway.pipeline import pipeline_run
from gateway.schema import DAY_RANGE_PARAMETERS, CompletionSchema, gateway_responses
from gateway.selectors import models_for_key
from gateway.serializers import (
    BalanceSerializer,
    CompletionRequestSerializer,
    LedgerPageSerializer,
    ModelListSerializer,
    UsageSerializer,
)
from gateway.upstreams.base import Adapter
from gateway.upstreams.responses import stored_response_refusal


class FirstRenderer(BaseContentNegotiation):
    """No negotiation: the view's first parser and renderer (the completion views answer in
    the provider's format whatever the client accepts, as the providers do)."""

    def select_parser(self, request: Request, parsers: Any) -> Any:
        return parsers[0] if parsers else None

    def select_renderer(
        self, request: Request, renderers: Any, format_suffix: str | None = None
    ) -> tuple[Any, str]:
        return renderers[0], renderers[0].media_type


class GatewayView(APIView):
    """A sync /v1/ view: the request's API key (uncached: a read has no hold to re-check a key
    revoked a moment ago) as `api_key`, errors in `style`."""

    authentication_classes = [ApiKeyAuthentication]
    style: ClassVar[str] = OPENAI

    @property
    def api_key(self) -> ApiKey:
        return self.request.auth  # type: ignore[return-value]


_request_serializers: dict[tuple[type[Any], type[Any]], CompletionRequestSerializer] = {}


def _request_serializer(
    serializer_class: type[CompletionRequestSerializer], adapter: type[Adapter]
) -> CompletionRequestSerializer:
    key = (serializer_class, adapter)
    serializer = _request_serializers.get(key)
    if serializer is None:
        serializer = _request_serializers[key] = serializer_class(context={"adapter": adapter})
    return serializer


class CompletionView(AsyncAPIView):
    """A completion endpoint (async: adrf): the key (cached), the body as `serializer_class`
    validates it (through `adapter`), then the one billing pipeline. A stream is answered as
    a StreamingHttpResponse over the pipeline's async generator, which Django's ASGI handler
    consumes on the event loop (adrf only awaits the view: it never iterates the response)."""

    adapter: type[Adapter] | None = None
    serializer_class: type[CompletionRequestSerializer] = CompletionRequestSerializer
    response_serializer: Any = None  # the documented 200 JSON body
    authentication_classes = [ApiKeyAuthentication]
    api_key_cached = True  # ApiKeyAuthentication: the process's key cache (the hold re-checks)
    http_method_names = ["post"]  # anything else is a 405 with `Allow: POST`
    content_negotiation_class = FirstRenderer  # the answer is the provider's JSON or stream
    schema = CompletionSchema()

    @property
    def style(self) -> str:
        assert self.adapter is not None
        return self.adapter.style

    def method_check(self, request: Request) -> None:
        # The method first, as the providers answer: a GET is a 405 with or without a key.
        if request.method is None or request.method.lower() not in self.http_method_names:
            raise MethodNotAllowed(request.method or "")

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self.method_check(request)
        super().initial(request, *args, **kwargs)

    async def async_dispatch(
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        """adrf's async_dispatch, but for a key this process has cached the checks before the
        handler (`initial`: the method, content negotiation, the key) run on the event loop,
        as they need no database then. adrf runs them in a thread for every request: a thread
        hop per request on the hot path. A key the cache does not know is looked up by
        ApiKeyAuthentication in the request's thread, as adrf does. (So a permission or
        throttle class on these views must be sync and need no database.)"""
        self.args, self.kwargs = args, kwargs
        drf_request = self.initialize_request(request, *args, **kwargs)
        self.request = drf_request
        self.headers = self.default_response_headers
        try:
            self.method_check(drf_request)
            api_key = ApiKeyAuthentication.cached_key(drf_request)
            if api_key is None:
                await sync_to_async(self.initial)(drf_request, *args, **kwargs)
            else:
                # DRF's public setters: the request is authenticated, initial skips it.
                drf_request.user, drf_request.auth = None, api_key
                self.initial(drf_request, *args, **kwargs)
            response = await self.post(drf_request, *args, **kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(drf_request, response, *args, **kwargs)
        return self.response

    async def post(self, request: Request) -> HttpResponseBase:
        adapter = self.adapter
        assert adapter is not None, "CompletionView.as_view(adapter=...)"
        # The middleware's request id and start (gateway/middleware.py), on Django's request
        # (DRF's Request reads through to it).
        completion = CompletionRequest(
            request_id=getattr(request, "request_id", None) or request_id_new(),
            body=request.body,
            headers=MetaHeaders(request.META),
        )
        # The adapter raises its own 400 (a serializer per view and adapter: it keeps no state).
        parsed = _request_serializer(self.serializer_class, adapter).run_validation(
            request_json(completion)
        )
        answer = await pipeline_run(
            request=completion,
            adapter=adapter,
            api_key=cast(ApiKey, request.auth),
            parsed=parsed,
            started=getattr(request, "started", None) or time.monotonic(),
        )
        return answer_response(answer)


class StoredResponseView(GatewayView):
    """/v1/responses/{response_id} (retrieve, delete) and its /cancel and /input_items: this
    gateway stores no responses (it forwards store: false), so there is none to find. Always
    the 400 that names `response_id`, as `store` and `previous_response_id` get theirs; nothing
    is held or billed."""

    http_method_names = ["get", "post", "delete"]

    @extend_schema(request=None, responses=gateway_responses({}, errors=(400,)))
    def get(self, request: Request, response_id: str) -> HttpResponseBase:
        raise stored_response_refusal()

    post = delete = get


class ModelsView(GatewayView):
    @extend_schema(responses=gateway_responses(ModelListSerializer, errors=()))
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
    @extend_schema(responses=gateway_responses(BalanceSerializer, errors=(404,)))
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
    @extend_schema(
        parameters=[
            OpenApiParameter("cursor", str, description="The `next` or `previous` of a page."),
            OpenApiParameter("limit", int, description="Entries per page (50; at most 500)."),
        ],
        responses=gateway_responses(LedgerPageSerializer, errors=(404,)),
    )
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
    return datetime.combine(day, day_time.min, tzinfo=UTC)


class UsageView(GatewayView):
    @extend_schema(
        parameters=DAY_RANGE_PARAMETERS,
        responses=gateway_responses(UsageSerializer),
    )
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
