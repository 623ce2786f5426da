"""Payments test fixtures: the local fake Stripe, signed webhook deliveries, event builders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from billing.models import Hold
from billing.selectors import ledger_audit
from tests.billing.payments.stripe_fake import FakeStripe, fake_stripe_server, stripe_signature

WEBHOOK_SECRET = "whsec_test_secret_for_signing"


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with fake_stripe_server() as fake:
        yield fake


@pytest.fixture
def stripe_settings(settings: Any, fake_stripe: FakeStripe) -> FakeStripe:
    settings.PAYMENTS_PROVIDER = "stripe"
    settings.STRIPE_SECRET_KEY = "sk_test_fake"
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = fake_stripe.url
    return fake_stripe


def deliver(client: Client, event: dict[str, Any], *, secret: str = WEBHOOK_SECRET,
            timestamp: int | None = None) -> Any:
    payload = json.dumps(event).encode()
    return client.post(
        "/webhooks/stripe",
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=stripe_signature(payload, secret, timestamp=timestamp),
    )


def event(event_id: str, type: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": event_id, "object": "event", "type": type, "api_version": "2025-01-27",
            "created": 1764700000, "data": {"object": obj}}


def checkout_completed(*, account_id: int, session_id: str, intent_id: str, cents: int,
                       event_id: str | None = None, paid: bool = True) -> dict[str, Any]:
    return event(event_id or f"evt_{session_id}", "checkout.session.completed", {
        "id": session_id, "object": "checkout.session", "mode": "payment",
        "payment_status": "paid" if paid else "unpaid", "amount_total": cents,
        "currency": "usd", "customer": f"cus_{account_id}", "payment_intent": intent_id,
        "metadata": {"account_id": str(account_id), "kind": "checkout"},
    })


def charge_refunded(*, charge_id: str, intent_id: str, refunds: list[tuple[str, int]] | None,
                    event_id: str) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": charge_id, "object": "charge", "payment_intent": intent_id,
                           "amount": 0, "refunded": True}
    if refunds is not None:
        obj["refunds"] = {"object": "list", "has_more": False, "data": [
            {"id": refund_id, "object": "refund", "amount": cents, "charge": charge_id,
             "status": "succeeded"} for refund_id, cents in refunds]}
    return event(event_id, "charge.refunded", obj)


def dispute(*, dispute_id: str, intent_id: str, cents: int, closed: str | None,
            event_id: str) -> dict[str, Any]:
    obj = {"id": dispute_id, "object": "dispute", "amount": cents, "charge": f"ch_{intent_id}",
           "payment_intent": intent_id, "status": closed or "needs_response"}
    return event(event_id, "charge.dispute.closed" if closed else "charge.dispute.created", obj)


def assert_books_clean() -> None:
    """After every payments test: the ledger audits clean and no hold is left open."""
    report = ledger_audit()
    assert report.clean, report
    assert not Hold.objects.filter(state=Hold.State.ACTIVE).exists()
