"""POST /webhooks/stripe: signatures, storage before action, idempotency under duplicates and
any order, refunds and disputes. Events are signed here with the webhook secret."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from django.test import Client

from billing.models import Account, Checkout, LedgerTransaction, Notification, PaymentEvent
from billing.services.accounts import account_refundable
from tests.billing.payments.conftest import (
    WEBHOOK_SECRET,
    assert_books_clean,
    charge_refunded,
    checkout_completed,
    deliver,
    dispute,
    event,
)
from tests.billing.payments.stripe_fake import FakeStripe

pytestmark = pytest.mark.django_db(transaction=True)


def _balance(account: Account) -> Decimal:
    return Account.objects.get(pk=account.pk).balance


def _paid(client: Client, account: Account, *, cents: int = 2500, session: str = "cs_test_1",
          intent: str = "pi_1") -> None:
    answer = deliver(client, checkout_completed(account_id=account.pk, session_id=session,
                                                intent_id=intent, cents=cents))
    assert answer.status_code == 200, answer.content


def test_checkout_completed_posts_one_purchase_of_the_amount_paid(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    before = _balance(account)
    _paid(client, account, cents=2499)
    [purchase] = LedgerTransaction.objects.filter(kind="purchase")
    assert purchase.idempotency_key == "stripe:checkout:cs_test_1"
    for provider_id in ("cs_test_1", "pi_1", "evt_cs_test_1"):
        assert provider_id in purchase.memo
    legs = {leg.account_id: leg.amount for leg in purchase.legs.all()}
    assert legs == {account.pk: Decimal("24.99"), -4: Decimal("-24.99")}
    assert _balance(account) == before + Decimal("24.99")
    stored = PaymentEvent.objects.get(event_id="evt_cs_test_1")
    assert (stored.status, stored.transaction_ids) == ("applied", [purchase.pk])
    assert Notification.objects.filter(type="payment.succeeded", account=account).count() == 1
    assert_books_clean()


def test_a_redelivered_or_reissued_completion_posts_nothing_more(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    _paid(client, account)
    _paid(client, account)  # the same event again
    # Another event id for the same session: still one purchase (keyed by the session id).
    reissued = checkout_completed(account_id=account.pk, session_id="cs_test_1",
                                  intent_id="pi_1", cents=2500, event_id="evt_other")
    assert deliver(client, reissued).status_code == 200
    assert LedgerTransaction.objects.filter(kind="purchase").count() == 1
    assert PaymentEvent.objects.count() == 2
    assert Notification.objects.filter(type="payment.succeeded").count() == 1
    assert_books_clean()


@pytest.mark.parametrize(
    "signature",
    ["", "t=1,v1=deadbeef", "garbage"],
    ids=["missing", "wrong", "malformed"],
)
def test_a_bad_signature_is_a_400_and_nothing_is_stored(
    client: Client, account, stripe_settings: FakeStripe, signature: str  # type: ignore[no-untyped-def]
) -> None:
    headers = {"Stripe-Signature": signature} if signature else {}
    answer = client.post("/webhooks/stripe", data=b'{"id": "evt_x", "type": "x"}',
                         content_type="application/json", headers=headers)
    assert answer.status_code == 400
    assert not PaymentEvent.objects.exists()
    assert not LedgerTransaction.objects.filter(kind="purchase").exists()


def test_a_signature_by_another_secret_or_too_old_is_refused(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    completed = checkout_completed(account_id=account.pk, session_id="cs_1", intent_id="pi_1",
                                   cents=1000)
    assert deliver(client, completed, secret="whsec_someone_else").status_code == 400
    stale = int(time.time()) - 301  # beyond Stripe's 300 s tolerance
    assert deliver(client, completed, timestamp=stale).status_code == 400
    assert not PaymentEvent.objects.exists()
    assert deliver(client, completed, timestamp=int(time.time()) - 200).status_code == 200


def test_unused_event_types_are_stored_as_ignored(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    answer = deliver(client, event("evt_cust", "customer.updated", {"id": "cus_1"}))
    assert answer.status_code == 200
    assert PaymentEvent.objects.get(event_id="evt_cust").status == "ignored"
    unpaid = checkout_completed(account_id=account.pk, session_id="cs_2", intent_id="pi_2",
                                cents=1000, paid=False)
    assert deliver(client, unpaid).status_code == 200
    assert PaymentEvent.objects.get(event_id="evt_cs_2").status == "ignored"
    assert not LedgerTransaction.objects.filter(kind="purchase").exists()


def test_the_checkout_intent_keeps_the_payment_method_for_auto_topup(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    intent = {"id": "pi_1", "object": "payment_intent", "amount": 2500, "amount_received": 2500,
              "status": "succeeded", "customer": "cus_9", "payment_method": "pm_card_1",
              "metadata": {"account_id": str(account.pk), "kind": "checkout"}}
    assert deliver(client, event("evt_pi_1", "payment_intent.succeeded", intent)).status_code == 200
    account.refresh_from_db()
    assert (account.payment_customer_id, account.payment_method_id) == ("cus_9", "pm_card_1")
    assert not LedgerTransaction.objects.filter(kind="purchase").exists()  # the session credits
    second = {**intent, "id": "pi_2", "payment_method": "pm_card_2"}
    deliver(client, event("evt_pi_2", "payment_intent.succeeded", second))
    account.refresh_from_db()
    assert account.payment_method_id == "pm_card_1"  # the first checkout's


def test_partial_refunds_add_up_once_each(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    _paid(client, account, cents=5000)
    before = _balance(account)
    first = charge_refunded(charge_id="ch_1", intent_id="pi_1", refunds=[("re_1", 1000)],
                            event_id="evt_r1")
    both = charge_refunded(charge_id="ch_1", intent_id="pi_1",
                           refunds=[("re_1", 1000), ("re_2", 1500)], event_id="evt_r2")
    for delivered in (first, both, first, both):
        assert deliver(client, delivered).status_code == 200
    refunds = LedgerTransaction.objects.filter(kind="refund").order_by("pk")
    assert [r.idempotency_key for r in refunds] == ["stripe:refund:re_1", "stripe:refund:re_2"]
    assert "ch_1" in refunds[0].memo and "re_1" in refunds[0].memo
    assert _balance(account) == before - Decimal("25.00")
    assert {leg.account_id: leg.amount for leg in refunds[1].legs.all()} == {
        account.pk: Decimal("-15.00"), -4: Decimal("15.00")}
    assert PaymentEvent.objects.get(event_id="evt_r2").transaction_ids == [refunds[1].pk]
    assert_books_clean()


def test_a_refund_lowers_what_finance_may_still_refund(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    refundable = account_refundable(account_id=account.pk)
    _paid(client, account, cents=5000)
    assert account_refundable(account_id=account.pk) == refundable + Decimal("50")
    deliver(client, charge_refunded(charge_id="ch_1", intent_id="pi_1",
                                    refunds=[("re_1", 2000)], event_id="evt_r"))
    assert account_refundable(account_id=account.pk) == refundable + Decimal("30")


def test_refunds_the_event_does_not_carry_are_listed_through_the_api(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    _paid(client, account, cents=5000)
    stripe_settings.refunds["ch_1"] = [
        {"id": "re_a", "object": "refund", "amount": 700, "charge": "ch_1", "status": "succeeded"},
        {"id": "re_b", "object": "refund", "amount": 300, "charge": "ch_1", "status": "failed"},
    ]
    before = _balance(account)
    deliver(client, charge_refunded(charge_id="ch_1", intent_id="pi_1", refunds=None,
                                    event_id="evt_r"))
    assert stripe_settings.calls("GET", "/v1/refunds") == [{"charge": "ch_1", "limit": "100"}]
    assert _balance(account) == before - Decimal("7.00")  # the failed refund returned nothing
    assert_books_clean()


def test_a_dispute_moves_the_amount_out_bounded_by_the_charge_and_a_win_gives_it_back(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    _paid(client, account, cents=2000)
    paid = _balance(account)
    # More disputed than the charge brought in: bounded by it. The balance goes below zero.
    created = dispute(dispute_id="dp_1", intent_id="pi_1", cents=9999, closed=None,
                      event_id="evt_d1")
    assert deliver(client, created).status_code == 200
    assert deliver(client, created).status_code == 200
    assert _balance(account) == paid - Decimal("20.00")
    won = dispute(dispute_id="dp_1", intent_id="pi_1", cents=9999, closed="won", event_id="evt_d2")
    assert deliver(client, won).status_code == 200
    assert deliver(client, won).status_code == 200
    assert _balance(account) == paid
    reversal = LedgerTransaction.objects.get(idempotency_key="stripe:dispute:dp_1:won")
    assert reversal.kind == "reversal"
    assert_books_clean()


def test_a_dispute_can_take_the_balance_below_zero_and_a_lost_one_stays_out(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    _paid(client, account, cents=2000)
    before_dispute = _balance(account)
    deliver(client, dispute(dispute_id="dp_1", intent_id="pi_1", cents=2000, closed=None,
                            event_id="evt_d1"))
    deliver(client, dispute(dispute_id="dp_1", intent_id="pi_1", cents=2000, closed="lost",
                            event_id="evt_d2"))
    assert _balance(account) == before_dispute - Decimal("20.00")
    assert PaymentEvent.objects.get(event_id="evt_d2").status == "ignored"
    assert_books_clean()


def test_events_before_the_payment_they_refer_to_wait_and_then_apply(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    before = _balance(account)
    refund = charge_refunded(charge_id="ch_1", intent_id="pi_1", refunds=[("re_1", 500)],
                             event_id="evt_r")
    assert deliver(client, refund).status_code == 200
    assert PaymentEvent.objects.get(event_id="evt_r").status == "failed"  # waiting
    # A dispute won before its creation arrives: net nothing, whatever the order.
    won = dispute(dispute_id="dp_1", intent_id="pi_1", cents=800, closed="won", event_id="evt_w")
    created = dispute(dispute_id="dp_1", intent_id="pi_1", cents=800, closed=None,
                      event_id="evt_c")
    assert deliver(client, won).status_code == 200
    _paid(client, account, cents=3000)
    assert deliver(client, created).status_code == 200
    assert PaymentEvent.objects.get(event_id="evt_r").status == "applied"
    assert _balance(account) == before + Decimal("30.00") - Decimal("5.00")
    assert Checkout.objects.get(session_id="cs_test_1").transaction_id is not None
    assert_books_clean()


def test_an_event_for_an_unknown_account_is_kept_as_failed(
    client: Client, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    completed = checkout_completed(account_id=999999, session_id="cs_x", intent_id="pi_x",
                                   cents=1000)
    assert deliver(client, completed).status_code == 200
    stored = PaymentEvent.objects.get(event_id="evt_cs_x")
    assert stored.status == "failed" and "999999" in stored.detail
    assert not LedgerTransaction.objects.filter(kind="purchase").exists()


def test_the_webhook_secret_is_what_signs(settings, client: Client, account) -> None:  # type: ignore[no-untyped-def]
    settings.STRIPE_WEBHOOK_SECRET = ""  # unset: nothing verifies, so nothing is accepted
    completed = checkout_completed(account_id=account.pk, session_id="cs_1", intent_id="pi_1",
                                   cents=1000)
    assert deliver(client, completed, secret=WEBHOOK_SECRET).status_code == 400
