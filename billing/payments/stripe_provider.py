"""Stripe, through the official `stripe` package (StripeClient; STRIPE_API_BASE points it
elsewhere, e.g. at the tests' local fake)."""

from __future__ import annotations

import json
from typing import Any

import stripe
from django.conf import settings

from billing.payments.providers import (
    CheckoutSession,
    OffSessionCharge,
    PaymentDeclined,
    PaymentProviderError,
    WebhookSignatureInvalid,
)

# Stripe's default: a signature older (or newer) than this is refused.
WEBHOOK_TOLERANCE_SECONDS = 300


class StripeProvider:
    name = "stripe"

    def __init__(self) -> None:
        base = settings.STRIPE_API_BASE
        self.client = stripe.StripeClient(
            api_key=settings.STRIPE_SECRET_KEY,
            base_addresses={"api": base} if base else None,
            max_network_retries=2,  # with the same idempotency key: never a second charge
        )

    def _customer(self, *, account_id: int, customer_id: str, billing_email: str) -> str:
        if customer_id:
            return customer_id
        params: dict[str, Any] = {"metadata": {"account_id": str(account_id)}}
        if billing_email:
            params["email"] = billing_email
        customer = self.client.v1.customers.create(
            params=params,  # type: ignore[arg-type]
            options={"idempotency_key": f"customer-for-account-{account_id}"},
        )
        return str(customer.id)

    def checkout_create(
        self,
        *,
        account_id: int,
        customer_id: str,
        billing_email: str,
        amount_cents: int,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> CheckoutSession:
        try:
            customer = self._customer(
                account_id=account_id, customer_id=customer_id, billing_email=billing_email
            )
            metadata = {"account_id": str(account_id), "kind": "checkout"}
            session = self.client.v1.checkout.sessions.create(
                params={
                    "mode": "payment",
                    "customer": customer,
                    "line_items": [
                        {
                            "quantity": 1,
                            "price_data": {
                                "currency": "usd",
                                "unit_amount": amount_cents,
                                "product_data": {"name": "Account credit"},
                            },
                        }
                    ],
                    "metadata": metadata,
                    # Keeps the card for auto top-up (off-session PaymentIntents).
                    "payment_intent_data": {
                        "setup_future_usage": "off_session",
                        "metadata": metadata,
                    },
                    "success_url": success_url,
                    "cancel_url": cancel_url,
                },
                options={"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            raise PaymentProviderError(f"Stripe: {exc.user_message or exc}") from exc
        return CheckoutSession(
            session_id=str(session.id), url=str(session.url), customer_id=customer
        )

    def off_session_charge(
        self,
        *,
        account_id: int,
        attempt_id: int,
        customer_id: str,
        payment_method_id: str,
        amount_cents: int,
        idempotency_key: str,
    ) -> OffSessionCharge:
        try:
            intent = self.client.v1.payment_intents.create(
                params={
                    "amount": amount_cents,
                    "currency": "usd",
                    "customer": customer_id,
                    "payment_method": payment_method_id,
                    "off_session": True,
                    "confirm": True,
                    "metadata": {
                        "account_id": str(account_id),
                        "kind": "auto_topup",
                        "auto_topup_attempt_id": str(attempt_id),
                    },
                },
                options={"idempotency_key": idempotency_key},
            )
        except stripe.CardError as exc:
            raise PaymentDeclined(exc.user_message or str(exc)) from exc
        except stripe.StripeError as exc:
            raise PaymentProviderError(f"Stripe: {exc.user_message or exc}") from exc
        return OffSessionCharge(intent_id=str(intent.id), status=str(intent.status))

    def refunds_list(self, *, charge_id: str) -> list[dict[str, Any]]:
        try:
            page = self.client.v1.refunds.list(params={"charge": charge_id, "limit": 100})
            return [refund.to_dict() for refund in page.auto_paging_iter()]
        except stripe.StripeError as exc:
            raise PaymentProviderError(f"Stripe: {exc.user_message or exc}") from exc

    def webhook_verify(self, *, payload: bytes, signature: str) -> dict[str, Any]:
        secret = settings.STRIPE_WEBHOOK_SECRET
        if not secret or not signature:
            raise WebhookSignatureInvalid("missing signature or STRIPE_WEBHOOK_SECRET")
        try:
            stripe.WebhookSignature.verify_header(
                payload.decode("utf-8"), signature, secret, WEBHOOK_TOLERANCE_SECONDS
            )
            event = json.loads(payload)
        except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError) as exc:
            raise WebhookSignatureInvalid(str(exc)) from exc
        if not isinstance(event, dict) or not isinstance(event.get("id"), str):
            raise WebhookSignatureInvalid("not an event")
        return event
