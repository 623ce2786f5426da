"""Payments over HTTP: the account's top-up and alert endpoints (admin-scope keys), Stripe's
webhook, and the dummy provider's checkout page. Thin: each calls one service."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods
from drf_spectacular.utils import extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.views import APIView

from billing.models import Checkout
from billing.money import MoneyError, money_parse
from billing.payments.providers import (
    PaymentProviderError,
    WebhookSignatureInvalid,
    payment_provider,
)
from billing.payments.serializers import (
    AlertsRequestSerializer,
    AlertsSerializer,
    AutoTopupRequestSerializer,
    AutoTopupSerializer,
    CheckoutRequestSerializer,
    CheckoutSerializer,
)
from billing.payments.services import (
    PaymentInputError,
    alerts_set,
    amount_out,
    auto_topup_set,
    checkout_create,
    dummy_checkout_pay,
    payment_event_process,
    payment_event_record,
    topup_amount_parse,
)
from billing.permissions import AdminScopeKey
from gateway.errors import GatewayError, invalid_param
from gateway.schema import gateway_responses
from gateway.views import GatewayView


def _body(request: Request) -> dict[str, Any]:
    data = request.data
    if not isinstance(data, dict):
        raise GatewayError(
            400, "The body must be a JSON object.", "invalid_request_error", "invalid_json"
        )
    return data


def _input_errors(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except PaymentInputError as exc:
        raise invalid_param(exc.param, exc.message) from exc
    except PaymentProviderError as exc:
        raise GatewayError(
            502,
            "The payment provider could not be reached; retry shortly.",
            "api_error",
            "payment_provider_error",
        ) from exc


def _optional_amount(data: dict[str, Any], name: str) -> Decimal | None:
    if name not in data or data[name] is None:
        return None
    raw = data[name]
    if isinstance(raw, float | bool):
        raise invalid_param(name, f"'{name}' must be a decimal string like \"10.00\".")
    try:
        return money_parse(str(raw))
    except MoneyError:
        raise invalid_param(name, f"'{name}' must be a decimal amount in USD.") from None


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise invalid_param(name, f"'{name}' must be a string.")
    return value


class CheckoutView(GatewayView):
    """A top-up: a checkout session at the payment provider for `amount` USD. The credit is
    posted when the provider says the payment completed."""

    permission_classes = [AdminScopeKey]

    @extend_schema(
        operation_id="billing_checkout_create",
        request=CheckoutRequestSerializer,
        responses=gateway_responses({201: CheckoutSerializer}, errors=(400, 403, 415, 502)),
    )
    def post(self, request: Request) -> HttpResponseBase:
        data = _body(request)
        amount = _input_errors(lambda: topup_amount_parse(data.get("amount")))
        success_url, cancel_url = _text(data, "success_url"), _text(data, "cancel_url")
        checkout = _input_errors(
            lambda: checkout_create(
                account_id=self.api_key.account_id,
                amount=amount,
                success_url=success_url,
                cancel_url=cancel_url,
                now=timezone.now(),
            )
        )
        return JsonResponse(
            {
                "checkout_id": checkout.session_id,
                "url": request.build_absolute_uri(checkout.url),
                "amount": amount_out(checkout.amount),
            },
            status=201,
        )


class AutoTopupView(GatewayView):
    """The account's auto top-up: below the threshold, charge the amount to the card its first
    checkout saved, at most the monthly limit per UTC calendar month."""

    permission_classes = [AdminScopeKey]

    @extend_schema(
        operation_id="billing_auto_topup_update",
        request=AutoTopupRequestSerializer,
        responses=gateway_responses(AutoTopupSerializer, errors=(400, 403, 415)),
    )
    def patch(self, request: Request) -> HttpResponseBase:
        data = _body(request)
        enabled = data.get("enabled", True)
        if not isinstance(enabled, bool):
            raise invalid_param("enabled", "'enabled' must be true or false.")
        settings = _input_errors(
            lambda: auto_topup_set(
                account_id=self.api_key.account_id,
                enabled=enabled,
                threshold=_optional_amount(data, "auto_topup_threshold"),
                amount=_optional_amount(data, "auto_topup_amount"),
                monthly_limit=_optional_amount(data, "auto_topup_monthly_limit"),
            )
        )
        return JsonResponse(settings.as_json())


class AlertsView(GatewayView):
    """The account's balance alerts: the low-balance threshold, the webhook (Standard Webhooks
    signed; a new secret is in this answer only) and the billing email."""

    permission_classes = [AdminScopeKey]

    @extend_schema(
        operation_id="billing_alerts_update",
        request=AlertsRequestSerializer,
        responses=gateway_responses(AlertsSerializer, errors=(400, 403, 415)),
    )
    def patch(self, request: Request) -> HttpResponseBase:
        data = _body(request)
        options: dict[str, Any] = {}
        if "low_balance_threshold" in data:
            options["low_balance_threshold"] = _optional_amount(data, "low_balance_threshold")
        for name in ("webhook_url", "billing_email"):
            if name in data:
                options[name] = _text(data, name) if data[name] is not None else ""
        rotate = data.get("rotate_webhook_secret", False)
        if not isinstance(rotate, bool):
            raise invalid_param(
                "rotate_webhook_secret", "'rotate_webhook_secret' must be true or false."
            )
        alerts = _input_errors(
            lambda: alerts_set(account_id=self.api_key.account_id, rotate_secret=rotate, **options)
        )
        return JsonResponse(alerts.as_json())


@extend_schema(exclude=True)
class StripeWebhookView(APIView):
    """Stripe's events: verified (STRIPE_WEBHOOK_SECRET, 300 s tolerance), stored unique by
    id, then applied; a duplicate or concurrent delivery gets 200 as well."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    def post(self, request: Request) -> HttpResponseBase:
        provider = payment_provider("stripe")
        try:
            event = provider.webhook_verify(
                payload=request.body, signature=request.headers.get("Stripe-Signature", "")
            )
        except WebhookSignatureInvalid:
            return JsonResponse({"error": "invalid signature"}, status=400)
        now = timezone.now()
        stored = payment_event_record(provider=provider.name, event=event, now=now)
        try:
            applied = payment_event_process(event_id=stored.pk, now=now)
        except PaymentProviderError:
            # Listing a charge's refunds failed: a non-2xx makes Stripe deliver it again.
            return JsonResponse({"error": "provider unavailable, retry"}, status=503)
        return JsonResponse({"received": True, "status": applied.status})


@require_http_methods(["GET", "POST"])
def dummy_checkout_page(request: HttpRequest, session_id: str) -> HttpResponse:
    """The dummy provider's checkout: one button that pays at once."""
    checkout = Checkout.objects.filter(provider="dummy", session_id=session_id).first()
    if checkout is None:
        raise Http404("no such checkout")
    if request.method == "POST" and checkout.status == Checkout.Status.OPEN:
        checkout = dummy_checkout_pay(session_id=session_id, now=timezone.now())
    if request.method == "POST":
        return redirect("payments-dummy-checkout", session_id=session_id)
    return render(
        request,
        "payments/dummy_checkout.html",
        {"checkout": checkout, "amount": amount_out(checkout.amount)},
    )
