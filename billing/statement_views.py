"""The account's monthly statements under /v1/billing/statements/: JSON and PDF, with one of
the account's own keys of scope `admin` (billing.permissions.AdminScopeKey). Thin DRF views
over billing/statements.py: an issued statement as issued, else computed from the ledger
(the current month provisional, up to now)."""

from __future__ import annotations

from django.http import HttpResponse, HttpResponseBase, JsonResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.request import Request

from billing.errors import InvalidAmount
from billing.permissions import AdminScopeKey
from billing.statements import StatementFigures, month_parse, statement_get, statement_pdf
from gateway.errors import GatewayError
from gateway.schema import gateway_responses
from gateway.views import GatewayView

MONTH = OpenApiParameter(
    "month",
    str,
    OpenApiParameter.PATH,
    required=True,
    pattern=r"^\d{4}-\d{2}$",
    description="A UTC calendar month, YYYY-MM (the current one: so far).",
)


class StatementView(GatewayView):
    permission_classes = [AdminScopeKey]

    def statement(self, month: str) -> tuple[StatementFigures, bytes | None]:
        try:
            return statement_get(
                account_id=self.api_key.account_id, month=month_parse(month), now=timezone.now()
            )
        except InvalidAmount as exc:  # a malformed month, or one not started yet
            raise GatewayError(400, str(exc), "invalid_request_error", "invalid_month") from exc

    @extend_schema(
        operation_id="billing_statement_retrieve",
        description="The account's statement of a UTC month, as JSON (admin scope).",
        parameters=[MONTH],
        responses=gateway_responses(
            OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="opening_balance, closing_balance (decimal strings), the month's "
                "movements by kind, usage by model, write-offs; provisional for the current "
                "month.",
            ),
            errors=(400, 403),
        )
    )
    def get(self, request: Request, month: str) -> HttpResponseBase:
        figures, _ = self.statement(month)
        return JsonResponse(figures.data)


class StatementPdfView(StatementView):
    @extend_schema(
        operation_id="billing_statement_pdf_retrieve",
        description="The account's statement of a UTC month, as PDF (admin scope).",
        parameters=[MONTH],
        responses=gateway_responses(
            {(200, "application/pdf"): OpenApiResponse(OpenApiTypes.BINARY)}, errors=(400, 403)
        )
    )
    def get(self, request: Request, month: str) -> HttpResponseBase:
        figures, pdf = self.statement(month)
        response = HttpResponse(
            pdf if pdf is not None else statement_pdf(figures), content_type="application/pdf"
        )
        response["Content-Disposition"] = f'inline; filename="statement-{month}.pdf"'
        return response
