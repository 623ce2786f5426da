"""Settlement retries through a real Celery worker and Redis, with faults injected at the
database (a row lock held elsewhere) and at the worker (SIGKILL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from billing.models import Account, Hold, LedgerTransaction, UsageRecord
from billing.pricing import Usage
from billing.services.holds import RequestDetails, hold_place
from reconciliation.models import ReconciliationItem
from reconciliation.services.failures import deduction_failure_record, settlement_handoff
from tests.factories import make_account, make_key
from tests.workers import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

COST = Decimal("0.2500000000")
USAGE = Usage(input_tokens=1000, output_tokens=200)


def _held_request(request_id: str) -> Account:
    """An account with 10 USD and an active 1 USD hold for `request_id` (expiring in 15 min)."""
    account = make_account(credits=Decimal("10"))
    key = make_key(account=account).api_key
    hold_place(
        api_key=key,
        request_id=request_id,
        amount=Decimal("1"),
        now=timezone.now(),
        model_alias="gpt-test",
    )
    return account


def _details() -> RequestDetails:
    return RequestDetails(endpoint="chat", started_at=datetime.now(UTC), stream=True)


def _hand_off(request_id: str) -> bool:
    return settlement_handoff(
        request_id=request_id, cost=COST, usage=USAGE, details=_details(), error="db down"
    )


def _settled(request_id: str) -> bool:
    return Hold.objects.filter(request_id=request_id, state=Hold.State.SETTLED).exists()


def _assert_charged_once(account: Account, request_id: str) -> None:
    assert LedgerTransaction.objects.filter(request_id=request_id).count() == 1
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    account.refresh_from_db()
    assert account.balance == Decimal("10") - COST
    assert account.held == 0


def test_handed_off_settle_is_charged_by_the_worker(running_worker):
    account = _held_request("req-handoff")

    assert _hand_off("req-handoff") is True

    wait_until(lambda: _settled("req-handoff"), timeout=20)
    _assert_charged_once(account, "req-handoff")


def test_settle_failing_on_the_database_is_retried_and_charged_once(running_worker, row_locker):
    account = _held_request("req-locked")
    row_locker.hold_lock("req-locked")

    _hand_off("req-locked")
    # The worker's settle times out on the lock: a database error, retried with backoff.
    wait_until(lambda: "req-locked failed (attempt 1)" in running_worker.log(), timeout=20)
    assert not LedgerTransaction.objects.filter(request_id="req-locked").exists()
    row_locker.release()

    wait_until(lambda: _settled("req-locked"), timeout=20)
    _assert_charged_once(account, "req-locked")


def test_duplicate_hand_offs_charge_once(running_worker):
    account = _held_request("req-twice")
    log_start = len(running_worker.log())

    _hand_off("req-twice")
    _hand_off("req-twice")

    # One run settles, the other finds the settle done and charges nothing.
    wait_until(lambda: "'replayed'" in running_worker.log()[log_start:], timeout=20)
    assert running_worker.log()[log_start:].count("'settled'") == 1
    _assert_charged_once(account, "req-twice")


def test_worker_killed_mid_settle_gets_the_task_back_and_charges_once(celery_worker, row_locker):
    if celery_worker.process is None:
        celery_worker.start()
    account = _held_request("req-killed")
    row_locker.hold_lock("req-killed")

    _hand_off("req-killed")
    wait_until(lambda: row_locker.waiting_backends() >= 1, timeout=20)  # blocked on the lock
    celery_worker.kill()
    row_locker.release()
    # The killed worker's settle is one statement in autocommit: PostgreSQL may still finish a
    # statement it had received when its client died. Whether it did or not, the task comes
    # back and must either settle or find the settle done, never charge again.

    celery_worker.start()  # a new log per start
    # Redis hands the unacknowledged task back once the visibility timeout (5 s) has passed.
    wait_until(
        lambda: "'settled'" in celery_worker.log() or "'replayed'" in celery_worker.log(),
        timeout=40,
    )
    assert _settled("req-killed")
    _assert_charged_once(account, "req-killed")


def test_retry_failed_settlements_requeues_a_pending_failure_and_resolves_it(running_worker):
    account = _held_request("req-failed")
    item = deduction_failure_record(
        request_id="req-failed",
        cost=COST,
        usage=USAGE,
        details=_details(),
        error="OperationalError: connection refused",
        attempts=26,
        now=timezone.now(),
    )
    assert item is not None
    out = StringIO()

    call_command("retry_failed_settlements", "--json", stdout=out)

    assert json.loads(out.getvalue()) == {"enqueued": 1, "skipped": 0, "failed": 0}
    wait_until(lambda: _settled("req-failed"), timeout=20)
    _assert_charged_once(account, "req-failed")
    item.refresh_from_db()
    wait_until(
        lambda: (
            ReconciliationItem.objects.get(pk=item.pk).status == ReconciliationItem.Status.RESOLVED
        ),
        timeout=10,
    )
