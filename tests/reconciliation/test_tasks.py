"""The settlement retry task's decisions, run in this process (Sentry captured in memory)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.conf import settings
from django.utils import timezone

from billing import metrics
from billing.models import Hold, LedgerTransaction
from billing.pricing import Usage
from billing.services.holds import RequestDetails, hold_place, hold_release, hold_settle
from reconciliation.models import ReconciliationItem
from reconciliation.services.failures import settlement_retry_kwargs
from reconciliation.tasks import settle_retry_delay, settlement_retry
from tests.factories import make_account, make_key
from tests.reconciliation.conftest import run_python

COST = Decimal("0.2500000000")
USAGE = Usage(input_tokens=1000, output_tokens=200)


class _Extreme(random.Random):
    """Draws always at one end of the range, to bound the schedule."""

    def __init__(self, *, high: bool) -> None:
        super().__init__()
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


@pytest.mark.parametrize(
    ("retries", "low", "high"),
    [(0, 0.5, 1), (1, 1, 2), (3, 4, 8), (6, 30, 60), (20, 30, 60)],
    ids=["first", "second", "fourth", "capped", "long-capped"],
)
def test_retry_delay_doubles_to_the_cap_with_jitter_in_the_upper_half(retries, low, high):
    delays = {settle_retry_delay(retries=retries, cap=60) for _ in range(200)}

    assert min(delays) >= low
    assert max(delays) <= high
    assert len(delays) > 1


def test_default_retries_outlast_a_ten_minute_outage_even_with_the_shortest_jitter():
    shortest = sum(
        settle_retry_delay(retries=n, cap=60, rng=_Extreme(high=False))
        for n in range(settings.BILLING_SETTLE_MAX_RETRIES)
    )
    longest = sum(
        settle_retry_delay(retries=n, cap=60, rng=_Extreme(high=True))
        for n in range(settings.BILLING_SETTLE_MAX_RETRIES)
    )

    assert shortest > 600
    assert longest < 30 * 60


def _kwargs(request_id: str, cost: Decimal = COST) -> dict[str, object]:
    details = RequestDetails(endpoint="chat", started_at=datetime(2026, 1, 1, tzinfo=UTC))
    return settlement_retry_kwargs(request_id=request_id, cost=cost, usage=USAGE, details=details)


@pytest.fixture
def held(transactional_db):  # type: ignore[no-untyped-def]
    account = make_account(credits=Decimal("10"))
    issued = make_key(account=account)
    hold_place(
        api_key=issued.api_key,
        request_id="req-1",
        amount=Decimal("1"),
        now=timezone.now(),
        model_alias="gpt-test",
    )
    return issued


def _last_attempt(request_id: str, cost: Decimal = COST):  # type: ignore[no-untyped-def]
    """Run the task as its final retry would run."""
    return settlement_retry.apply(
        kwargs=_kwargs(request_id, cost), retries=settings.BILLING_SETTLE_MAX_RETRIES
    )


def _value(counter) -> float:  # type: ignore[no-untyped-def]
    return counter._value.get()


def test_exhausted_retries_record_one_deduction_failure(
    held, row_locker, short_lock_timeout, sentry_events
):
    row_locker.hold_lock("req-1")

    result = _last_attempt("req-1")

    assert result.get() == "failed"
    item = ReconciliationItem.objects.get()
    assert item.kind == ReconciliationItem.Kind.DEDUCTION_FAILURE
    assert item.status == ReconciliationItem.Status.PENDING
    assert (item.request_id, item.account_id) == ("req-1", held.api_key.account_id)
    assert item.key_prefix == held.api_key.prefix
    assert (item.model_alias, item.cost, item.held_amount) == ("gpt-test", COST, Decimal("1"))
    assert item.usage["input_tokens"] == 1000
    assert item.usage["output_tokens"] == 200
    assert item.attempts == settings.BILLING_SETTLE_MAX_RETRIES + 1
    assert "lock timeout" in item.error
    assert Hold.objects.get(request_id="req-1").state == Hold.State.ACTIVE  # still expires


def test_exhausted_retries_never_store_the_key_secret(
    held, row_locker, short_lock_timeout, sentry_events
):
    row_locker.hold_lock("req-1")

    _last_attempt("req-1")

    item = ReconciliationItem.objects.get()
    stored = " ".join(str(value) for value in item.__dict__.values())
    assert held.secret not in stored
    assert held.secret[len(held.api_key.prefix) :] not in stored


def test_exhausted_retries_send_one_fatal_sentry_event(
    held, row_locker, short_lock_timeout, sentry_events
):
    row_locker.hold_lock("req-1")

    _last_attempt("req-1")

    assert len(sentry_events) == 1
    event = sentry_events[0]
    assert event["level"] == "fatal"
    assert event["tags"]["request_id"] == "req-1"
    assert event["tags"]["account_id"] == str(held.api_key.account_id)
    assert held.secret not in str(event)


def test_exhausted_retries_count_the_missed_deduction_and_its_usd(
    held, row_locker, short_lock_timeout, sentry_events
):
    count_before = _value(metrics.MISSED_DEDUCTIONS)
    usd_before = _value(metrics.MISSED_DEDUCTIONS_USD)
    row_locker.hold_lock("req-1")

    _last_attempt("req-1")

    assert _value(metrics.MISSED_DEDUCTIONS) == count_before + 1
    assert _value(metrics.MISSED_DEDUCTIONS_USD) == pytest.approx(usd_before + 0.25)


def test_a_second_exhausted_run_keeps_one_item_and_one_alert(
    held, row_locker, short_lock_timeout, sentry_events
):
    row_locker.hold_lock("req-1")

    _last_attempt("req-1")
    _last_attempt("req-1")  # redelivered (acks_late), or retried by finance

    item = ReconciliationItem.objects.get()
    assert item.attempts == 2 * (settings.BILLING_SETTLE_MAX_RETRIES + 1)
    assert len(sentry_events) == 1


def test_a_transient_failure_before_the_last_attempt_is_retried_not_recorded(
    held, row_locker, short_lock_timeout, sentry_events
):
    row_locker.hold_lock("req-1")
    retries_before = metrics.SETTLEMENT_RETRIES.labels(outcome="retried")._value.get()

    # Eager mode runs the retry at once: the next attempt is the last and fails too.
    result = settlement_retry.apply(
        kwargs=_kwargs("req-1"), retries=settings.BILLING_SETTLE_MAX_RETRIES - 1
    )

    assert result.get() == "failed"
    assert metrics.SETTLEMENT_RETRIES.labels(outcome="retried")._value.get() == retries_before + 1
    assert ReconciliationItem.objects.count() == 1


def test_retry_of_a_released_hold_charges_nothing(held, sentry_events):
    hold_release(request_id="req-1", now=timezone.now())

    result = settlement_retry.apply(kwargs=_kwargs("req-1"))

    assert result.get() == "already_resolved"
    assert not LedgerTransaction.objects.filter(request_id="req-1").exists()
    assert not ReconciliationItem.objects.exists()


def test_retry_after_the_gateway_settled_replays_and_charges_once(held):
    hold_settle(request_id="req-1", cost=COST, usage=USAGE, now=timezone.now())

    result = settlement_retry.apply(kwargs=_kwargs("req-1"))

    assert result.get() == "replayed"
    assert LedgerTransaction.objects.filter(request_id="req-1").count() == 1


def test_retry_at_another_cost_than_settled_is_queued_for_finance(held, sentry_events):
    hold_settle(request_id="req-1", cost=COST, usage=USAGE, now=timezone.now())

    result = settlement_retry.apply(kwargs=_kwargs("req-1", cost=Decimal("0.5")))

    assert result.get() == "conflict"
    item = ReconciliationItem.objects.get()
    assert item.kind == ReconciliationItem.Kind.DEDUCTION_FAILURE
    assert "IdempotencyConflict" in item.error
    assert LedgerTransaction.objects.filter(request_id="req-1").count() == 1


def test_a_landed_retry_resolves_the_pending_failure_item(
    held, row_locker, short_lock_timeout, sentry_events
):
    row_locker.hold_lock("req-1")
    _last_attempt("req-1")
    row_locker.release()

    result = settlement_retry.apply(kwargs=_kwargs("req-1"))

    assert result.get() == "settled"
    item = ReconciliationItem.objects.get()
    assert item.status == ReconciliationItem.Status.RESOLVED
    assert item.transaction_id == Hold.objects.get(request_id="req-1").transaction_id


HANDOFF = """
from decimal import Decimal
from time import monotonic
from billing import metrics
from billing.pricing import Usage
from reconciliation.services.failures import settlement_handoff
started = monotonic()
queued = settlement_handoff(request_id="req-x", cost=Decimal("0.25"), usage=Usage(),
                            details=None, error="db down")
print(queued, metrics.SETTLEMENTS.labels(outcome="handoff_failed")._value.get(),
      round(monotonic() - started, 1))
"""


def test_handoff_with_broker_and_database_down_returns_false_and_counts_it():
    # Port 1 refuses connections: the broker is down, and so is the database the settle
    # just failed on (the hand-off must not need it).
    done = run_python(
        HANDOFF,
        REDIS_URL="redis://127.0.0.1:1/0",
        DATABASE_URL="postgres://postgres@127.0.0.1:1/billing",
    )

    assert done.returncode == 0, done.stderr
    queued, failures, seconds = done.stdout.split()
    assert (queued, failures) == ("False", "1.0")
    assert float(seconds) < 10


def test_retry_for_a_request_without_a_hold_is_recorded_not_retried(
    transactional_db, sentry_events
):
    result = settlement_retry.apply(kwargs=_kwargs("req-ghost"))

    assert result.failed()
    item = ReconciliationItem.objects.get()
    assert (item.request_id, item.account_id) == ("req-ghost", None)
    assert item.error.startswith("HoldNotFound")
    assert item.attempts == 1
