"""The `dummy` provider: a local checkout page that pays at once, for the quickstart, demos
and tests. It produces the events Stripe would send, in Stripe's shape, and they are recorded
and applied by the same services as Stripe's webhooks (`payment_event_record`,
`payment_event_process`): one code path."""

from __future__ import annotations

import secrets
from typing import Any

from django.urls import reverse

from billing.payments.providers import CheckoutSession, OffSessionCharge, WebhookSignatureInvalid


def _intent(
    *,
    intent_id: str,
    account_id: int,
    amount_cents: int,
    metadata: dict[str, str],
    customer_id: str,
    payment_method_id: str,
) -> dict[str, Any]:
    return {
        "id": intent_id,
        "object": "payment_intent",
        "amount": amount_cents,
        "amount_received": amount_cents,
        "currency": "usd",
        "status": "succeeded",
        "customer": customer_id,
        "payment_method": payment_method_id,
        "latest_charge": f"ch_{intent_id.removeprefix('pi_')}",
        "metadata": {"account_id": str(account_id), **metadata},
    }


def dummy_checkout_events(
    *, session_id: str, account_id: int, amount_cents: int
) -> list[dict[str, Any]]:
    """What Stripe sends when a checkout is paid: the session completed, and its intent
    succeeded (carrying the payment method that auto top-up will use)."""
    intent_id = f"pi_{session_id.removeprefix('cs_')}"
    customer_id = f"cus_dummy_{account_id}"
    payment_method_id = f"pm_dummy_{account_id}"
    metadata = {"account_id": str(account_id), "kind": "checkout"}
    session = {
        "id": session_id,
        "object": "checkout.session",
        "mode": "payment",
        "payment_status": "paid",
        "status": "complete",
        "amount_total": amount_cents,
        "currency": "usd",
        "customer": customer_id,
        "payment_intent": intent_id,
        "metadata": metadata,
    }
    intent = _intent(
        intent_id=intent_id,
        account_id=account_id,
        amount_cents=amount_cents,
        metadata={"kind": "checkout"},
        customer_id=customer_id,
        payment_method_id=payment_method_id,
    )
    return [
        {
            "id": f"evt_{session_id}_completed",
            "type": "checkout.session.completed",
            "data": {"object": session},
        },
        {
            "id": f"evt_{intent_id}_succeeded",
            "type": "payment_intent.succeeded",
            "data": {"object": intent},
        },
    ]


class DummyProvider:
    name = "dummy"

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
        session_id = f"cs_dummy_{secrets.token_hex(12)}"
        return CheckoutSession(
            session_id=session_id,
            url=reverse("payments-dummy-checkout", args=[session_id]),
            customer_id=customer_id or f"cus_dummy_{account_id}",
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
        intent_id = f"pi_dummy_topup_{attempt_id}"
        intent = _intent(
            intent_id=intent_id,
            account_id=account_id,
            amount_cents=amount_cents,
            metadata={"kind": "auto_topup", "auto_topup_attempt_id": str(attempt_id)},
            customer_id=customer_id,
            payment_method_id=payment_method_id,
        )
        event = {
            "id": f"evt_{intent_id}_succeeded",
            "type": "payment_intent.succeeded",
            "data": {"object": intent},
        }
        return OffSessionCharge(intent_id=intent_id, status="succeeded", events=[event])

    def refunds_list(self, *, charge_id: str) -> list[dict[str, Any]]:
        return []  # the dummy never refunds

    def webhook_verify(self, *, payload: bytes, signature: str) -> dict[str, Any]:
        raise WebhookSignatureInvalid("the dummy provider sends no webhooks")
