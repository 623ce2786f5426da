"""Auto top-up: the engine writes one attempt per crossing with the settle that crossed; one
task charges it off-session once (idempotency key per account and crossing), never beyond the
monthly limit (UTC calendar month); the credit comes with payment_intent.succeeded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from billing.models import Account, AutoTopupAttempt, LedgerTransaction, Notification
from billing.payments.services import auto_topup_charge, auto_topup_set
from config.celery import app as celery_app
from tests.billing.payments.conftest import WEBHOOK_SECRET, assert_books_clean, deliver, event
from tests.billing.payments.helpers import spend
from tests.billing.payments.stripe_fake import FakeStripe, fake_stripe_server
from tests.workers import CeleryWorker, database_url_of_tests, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _saved_card(account: Account) -> None:
    # What the first checkout's payment_intent.succeeded stores (tested in test_webhooks).
    Account.objects.filter(pk=account.pk).update(payment_customer_id="cus_saved",
                                                 payment_method_id="pm_saved")


def _enable(account: Account, *, limit: str = "25") -> None:
    auto_topup_set(account_id=account.pk, enabled=True, threshold=Decimal("5"),
                   amount=Decimal("10"), monthly_limit=Decimal(limit))


def _succeeded(client: Client, fake: FakeStripe, intent_id: str) -> None:
    answer = deliver(client, event(f"evt_{intent_id}", "payment_intent.succeeded",
                                   fake.intents[intent_id]))
    assert answer.status_code == 200


def test_a_burst_of_settles_below_the_threshold_makes_one_attempt(
    account, issued_key, now  # type: ignore[no-untyped-def]
) -> None:
    _enable(account)
    spend(issued_key, "4", now=now)  # 10 -> 6: above
    assert not AutoTopupAttempt.objects.exists()
    for _ in range(4):
        spend(issued_key, "1", now=now)  # 6 -> 2: crosses once
    [attempt] = AutoTopupAttempt.objects.all()
    assert (attempt.account_id, attempt.amount, attempt.status) == (
        account.pk, Decimal("10"), "pending")
    assert_books_clean()


def test_off_auto_topup_makes_no_attempt(account, issued_key, now) -> None:  # type: ignore[no-untyped-def]
    _enable(account)
    auto_topup_set(account_id=account.pk, enabled=False)
    spend(issued_key, "9", now=now)
    assert not AutoTopupAttempt.objects.exists()


def test_one_off_session_intent_per_crossing_credited_by_its_webhook(
    client: Client, account, issued_key, now, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    _saved_card(account)
    _enable(account)
    spend(issued_key, "8", now=now)  # 10 -> 2
    attempt = AutoTopupAttempt.objects.get()
    charged = auto_topup_charge(attempt_id=attempt.pk, now=now)
    auto_topup_charge(attempt_id=attempt.pk, now=now)  # a redelivered task: nothing more
    [intent] = stripe_settings.calls("POST", "/v1/payment_intents")
    assert intent["amount"] == "1000" and intent["currency"] == "usd"
    assert (intent["off_session"], intent["confirm"]) == ("true", "true")
    assert (intent["customer"], intent["payment_method"]) == ("cus_saved", "pm_saved")
    assert intent["metadata[auto_topup_attempt_id]"] == str(attempt.pk)
    [(_, _, _, headers)] = [r for r in stripe_settings.requests if r[1] == "/v1/payment_intents"]
    assert headers["idempotency-key"] == f"auto-topup-{account.pk}-{attempt.pk}"
    assert charged.status == "confirmed"
    assert not LedgerTransaction.objects.filter(kind="purchase").exists()  # not yet: the webhook
    _succeeded(client, stripe_settings, charged.payment_intent_id)
    _succeeded(client, stripe_settings, charged.payment_intent_id)
    [purchase] = LedgerTransaction.objects.filter(kind="purchase")
    assert purchase.idempotency_key == f"stripe:payment_intent:{charged.payment_intent_id}"
    assert Account.objects.get(pk=account.pk).balance == Decimal("12")
    attempt.refresh_from_db()
    assert (attempt.status, attempt.transaction_id) == ("succeeded", purchase.pk)
    [ok] = Notification.objects.filter(type="payment.succeeded")
    assert ok.payload["source"] == "auto_topup" and ok.payload["amount"] == "10.0000000000"
    assert_books_clean()


def test_a_declined_charge_is_recorded_and_tells_the_account_once(
    account, issued_key, now, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    _saved_card(account)
    _enable(account)
    stripe_settings.declines = 5
    spend(issued_key, "8", now=now)
    attempt = AutoTopupAttempt.objects.get()
    failed = auto_topup_charge(attempt_id=attempt.pk, now=now)
    auto_topup_charge(attempt_id=attempt.pk, now=now)
    assert failed.status == "failed" and "insufficient funds" in failed.failure_reason
    assert len(stripe_settings.calls("POST", "/v1/payment_intents")) == 1  # no retry storm
    [told] = Notification.objects.filter(type="payment.failed")
    assert told.payload["reason"] == failed.failure_reason
    spend(issued_key, "1", now=now)  # still below: the crossing had its one attempt
    assert AutoTopupAttempt.objects.count() == 1
    assert_books_clean()


def test_no_saved_payment_method_skips_the_attempt(
    account, issued_key, now, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    _enable(account)
    spend(issued_key, "8", now=now)
    skipped = auto_topup_charge(attempt_id=AutoTopupAttempt.objects.get().pk, now=now)
    assert skipped.status == "skipped" and "payment method" in skipped.failure_reason
    assert stripe_settings.requests == []


def test_set_auto_topup_command(account) -> None:  # type: ignore[no-untyped-def]
    out = StringIO()
    call_command("set_auto_topup", str(account.pk), "--threshold", "5", "--amount", "20",
                 "--monthly-limit", "100", "--json", stdout=out)
    assert json.loads(out.getvalue()) == {
        "account_id": account.pk, "enabled": True, "auto_topup_threshold": "5.0000000000",
        "auto_topup_amount": "20.0000000000", "auto_topup_monthly_limit": "100.0000000000"}
    out = StringIO()
    call_command("set_auto_topup", str(account.pk), "--off", "--json", stdout=out)
    assert json.loads(out.getvalue())["enabled"] is False
    assert Account.objects.get(pk=account.pk).auto_topup_amount == Decimal("20")


def test_the_api_sets_auto_topup_with_an_admin_key(client: Client, account, now) -> None:  # type: ignore[no-untyped-def]
    from tests.factories import make_key

    admin = make_key(account=account, now=now, scope="admin")
    answer = client.patch("/v1/billing/auto-topup", data={
        "auto_topup_threshold": "5", "auto_topup_amount": "10", "auto_topup_monthly_limit": "30",
    }, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {admin.secret}")
    assert answer.status_code == 200, answer.content
    assert answer.json() == {"enabled": True, "auto_topup_threshold": "5.0000000000",
                             "auto_topup_amount": "10.0000000000",
                             "auto_topup_monthly_limit": "30.0000000000"}
    bad = client.patch("/v1/billing/auto-topup", data={"auto_topup_amount": "1"},
                       content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {admin.secret}")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "auto_topup_amount"


# --- the monthly limit, with a real worker ---------------------------------------------------


@pytest.fixture(scope="module")
def stripe_for_worker() -> Iterator[FakeStripe]:
    with fake_stripe_server() as fake:
        yield fake


@pytest.fixture(scope="module")
def payments_worker(  # type: ignore[no-untyped-def]
    django_db_setup, stripe_for_worker: FakeStripe, tmp_path_factory
) -> Iterator[CeleryWorker]:
    """A worker of its own (its own queue), configured for Stripe at the fake."""
    from django.conf import settings

    queue = f"payments-test-{os.getpid()}"
    env = {key: value for key, value in os.environ.items()
           if key not in {"PROMETHEUS_MULTIPROC_DIR", "SENTRY_DSN", "CELERY_TASK_ALWAYS_EAGER"}}
    env |= {"DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": database_url_of_tests(),
            "REDIS_URL": settings.CELERY_BROKER_URL, "CELERY_TASK_DEFAULT_QUEUE": queue,
            "PAYMENTS_PROVIDER": "stripe", "STRIPE_SECRET_KEY": "sk_test_fake",
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "STRIPE_API_BASE": stripe_for_worker.url,
            "PGAPPNAME": "payments-test-worker", "PYTHONUNBUFFERED": "1"}
    previous = celery_app.conf.task_default_queue
    celery_app.conf.task_default_queue = queue
    celery_app.amqp.__dict__.pop("queues", None)
    worker = CeleryWorker(queue=queue, env=env, log_dir=tmp_path_factory.mktemp("payments"))
    worker.start()
    yield worker
    worker.stop()
    celery_app.conf.task_default_queue = previous
    celery_app.amqp.__dict__.pop("queues", None)


def test_never_more_than_the_monthly_limit_in_a_utc_month(
    payments_worker: CeleryWorker, stripe_for_worker: FakeStripe, client: Client, settings: Any,
    account, issued_key, now  # type: ignore[no-untyped-def]
) -> None:
    from billing.tasks import payments_relay

    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    _saved_card(account)
    _enable(account, limit="25")  # two top-ups of 10 fit in a month, a third does not

    def cross_and_charge(when: Any) -> AutoTopupAttempt:
        balance = Account.objects.get(pk=account.pk).balance
        spend(issued_key, str(balance - Decimal("1")), now=when)  # leaves 1 < 5: crossing
        attempt = AutoTopupAttempt.objects.order_by("-pk").first()
        assert attempt is not None
        payments_relay.delay()  # the beat's relay hands the pending attempt to its task
        decided = wait_until(lambda: AutoTopupAttempt.objects.exclude(
            status__in=["pending", "charging"]).filter(pk=attempt.pk).first(), timeout=30)
        if decided.status == "confirmed":
            _succeeded(client, stripe_for_worker, decided.payment_intent_id)  # credit: re-arms
        return decided

    month_end = now.replace(day=30, hour=23)
    statuses = [cross_and_charge(now).status, cross_and_charge(now + timedelta(days=1)).status]
    third = cross_and_charge(month_end)
    assert statuses == ["confirmed", "confirmed"]
    assert third.status == "skipped" and "monthly limit" in third.failure_reason
    assert len(stripe_for_worker.intents) == 2
    # The next UTC month has its own limit.
    account_row = Account.objects.get(pk=account.pk)
    assert not account_row.auto_topup_armed  # still below after the skipped attempt
    from tests.billing.payments.helpers import grant

    grant(account.pk, "10", now=month_end)  # back above: re-armed
    december = cross_and_charge(month_end + timedelta(hours=2))
    assert december.status == "confirmed"
    assert len(stripe_for_worker.intents) == 3
    purchases = LedgerTransaction.objects.filter(kind="purchase", memo__contains="auto top-up")
    assert purchases.count() == 3
    assert sum(p.legs.get(account_id=account.pk).amount for p in purchases) == Decimal("30")
    assert_books_clean()


def test_the_dummy_provider_tops_up_through_the_same_event_path(
    client: Client, account, issued_key, now, settings  # type: ignore[no-untyped-def]
) -> None:
    from billing.payments.services import checkout_create, dummy_checkout_pay

    settings.PAYMENTS_PROVIDER = "dummy"
    checkout = checkout_create(account_id=account.pk, amount=Decimal("5"), now=now)
    dummy_checkout_pay(session_id=checkout.session_id, now=now)  # saves the dummy card
    _enable(account)
    spend(issued_key, "14", now=now)  # 15 -> 1: crossing
    attempt = auto_topup_charge(attempt_id=AutoTopupAttempt.objects.get().pk, now=now)
    assert attempt.status == "succeeded"
    assert Account.objects.get(pk=account.pk).balance == Decimal("11")
    assert LedgerTransaction.objects.get(
        idempotency_key=f"dummy:payment_intent:{attempt.payment_intent_id}"
    ).pk == attempt.transaction_id
    assert_books_clean()
