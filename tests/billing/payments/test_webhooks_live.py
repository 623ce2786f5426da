"""Concurrent deliveries of one event against a real uvicorn: 8 threads released together by
a barrier post one purchase, and every delivery gets 200."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from billing.models import Account, LedgerTransaction, PaymentEvent
from tests.billing.payments.conftest import (
    WEBHOOK_SECRET,
    assert_books_clean,
    charge_refunded,
    checkout_completed,
)
from tests.billing.payments.stripe_fake import stripe_signature
from tests.gateway.conftest import LiveGateway, start_gateway, stop_gateway

pytestmark = pytest.mark.django_db(transaction=True)
DELIVERIES = 8


@pytest.fixture(scope="module")
def payments_gateway(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    gateway = start_gateway(
        tmp_path_factory.mktemp("payments-gateway") / "uvicorn.log",
        PAYMENTS_PROVIDER="stripe",
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        STRIPE_SECRET_KEY="sk_test_unused",
        STRIPE_API_BASE="http://127.0.0.1:9",  # no API call is expected: refunds are carried
    )
    yield gateway
    stop_gateway(gateway)


def _all_at_once(url: str, payload: bytes) -> list[int]:
    barrier = threading.Barrier(DELIVERIES)
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        signature = stripe_signature(payload, WEBHOOK_SECRET)
        with httpx.Client(timeout=30) as http:
            barrier.wait()
            status = http.post(url, content=payload, headers={
                "content-type": "application/json", "stripe-signature": signature,
            }).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(DELIVERIES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return statuses


def test_eight_concurrent_deliveries_of_a_completion_post_one_purchase(
    payments_gateway: LiveGateway, account: Account
) -> None:
    before = Account.objects.get(pk=account.pk).balance
    payload = json.dumps(checkout_completed(
        account_id=account.pk, session_id="cs_live", intent_id="pi_live", cents=4200
    )).encode()
    statuses = _all_at_once(f"{payments_gateway.url}/webhooks/stripe", payload)
    assert statuses == [200] * DELIVERIES
    assert LedgerTransaction.objects.filter(kind="purchase").count() == 1
    assert PaymentEvent.objects.filter(event_id="evt_cs_live").count() == 1
    assert Account.objects.get(pk=account.pk).balance == before + Decimal("42.00")
    assert_books_clean()


def test_eight_concurrent_deliveries_of_a_refund_post_it_once(
    payments_gateway: LiveGateway, account: Account
) -> None:
    url = f"{payments_gateway.url}/webhooks/stripe"
    completed = json.dumps(checkout_completed(
        account_id=account.pk, session_id="cs_live", intent_id="pi_live", cents=4200
    )).encode()
    assert _all_at_once(url, completed) == [200] * DELIVERIES
    refunded = json.dumps(charge_refunded(
        charge_id="ch_live", intent_id="pi_live", refunds=[("re_live", 1200)], event_id="evt_re"
    )).encode()
    assert _all_at_once(url, refunded) == [200] * DELIVERIES
    assert LedgerTransaction.objects.filter(kind="refund").count() == 1
    assert_books_clean()
