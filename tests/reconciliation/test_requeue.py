"""deduction_failures_requeue (reconciliation/services/failures.py), behind the
`retry_failed_settlements` command: what it queues, what it skips, its limit, a broker that is
down. What it queued is read back from Redis, from a queue no worker consumes; the last test
lets the real worker charge what was queued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any
from uuid import uuid4

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone
from kombu import Exchange, Queue

from billing.models import Hold, LedgerTransaction
from billing.pricing import Usage
from billing.services.holds import (
    RequestDetails,
    hold_place,
    hold_release,
    hold_settle,
    request_charge_post,
)
from config.celery import app as celery_app
from reconciliation.models import ReconciliationItem
from reconciliation.services.failures import (
    deduction_failure_record,
    deduction_failures_requeue,
    settlement_retry_kwargs,
)
from reconciliation.services.sweeps import holds_expire_and_queue
from reconciliation.tasks import settlement_retry
from tests.factories import make_account, make_key
from tests.workers import ROOT, database_url_of_tests, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

COST = Decimal("0.2500000000")
USAGE = Usage(input_tokens=1000, output_tokens=200)
BROKER_DOWN = "redis://127.0.0.1:1/0"  # port 1 refuses connections


def _publish_to(queue: str) -> None:
    """Point this process' task publishing at `queue` (Celery caches its routing lazily)."""
    celery_app.conf.task_default_queue = queue
    for cached in ("queues", "default_queue", "router", "send_task_message"):
        celery_app.amqp.__dict__.pop(cached, None)


@dataclass
class PublishedQueue:
    name: str

    def tasks(self) -> list[tuple[str, dict[str, Any]]]:
        """(task name, kwargs) of every message queued so far, oldest first; taken off."""
        taken: list[tuple[str, dict[str, Any]]] = []
        with celery_app.connection_for_read() as conn, conn.SimpleQueue(self.name) as queue:
            while True:
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    return taken
                _args, kwargs, _embed = message.payload
                taken.append((message.headers["task"], kwargs))
                message.ack()


@pytest.fixture
def published() -> Iterator[PublishedQueue]:
    """A queue of this test's own, which no worker consumes."""
    if not settings.CELERY_BROKER_URL.startswith("redis"):
        pytest.skip("needs Redis (run through bin/test)")
    queue = PublishedQueue(f"requeue-test-{os.getpid()}-{uuid4().hex[:8]}")
    previous = celery_app.conf.task_default_queue
    _publish_to(queue.name)
    try:
        yield queue
    finally:
        _publish_to(previous)
        with celery_app.connection_for_write() as conn:
            # Declared as Celery declared it, so the channel knows the bindings to delete.
            bound = Queue(queue.name, Exchange(queue.name), routing_key=queue.name)(
                conn.default_channel
            )
            bound.declare()
            bound.delete()


def _details() -> RequestDetails:
    return RequestDetails(endpoint="chat", started_at=datetime.now(UTC), stream=True)


def _held(request_id: str, *, now: datetime | None = None, ttl_seconds: int = 900) -> None:
    """An account with 10 USD and an active 1 USD hold for `request_id`."""
    now = now or timezone.now()
    account = make_account(credits=Decimal("10"), now=now)
    hold_place(
        api_key=make_key(account=account, now=now).api_key,
        request_id=request_id,
        amount=Decimal("1"),
        now=now,
        model_alias="gpt-test",
        ttl_seconds=ttl_seconds,
    )


def _failed(request_id: str, *, details: RequestDetails | None = None) -> ReconciliationItem:
    """The deduction failure the retries leave behind when they run out."""
    item = deduction_failure_record(
        request_id=request_id,
        cost=COST,
        usage=USAGE,
        details=details,
        error="OperationalError: connection refused",
        attempts=26,
        now=timezone.now(),
    )
    assert item is not None
    return item


def _requeued(queue: PublishedQueue) -> list[str]:
    tasks = queue.tasks()
    assert {name for name, _ in tasks} <= {settlement_retry.name}
    return [kwargs["request_id"] for _, kwargs in tasks]


def test_a_pending_failure_whose_hold_is_still_chargeable_is_queued_as_the_settle_was(
    published, sentry_events
):
    details = _details()
    _held("req-active")
    _failed("req-active", details=details)
    past = timezone.now() - timedelta(hours=1)
    _held("req-expired", now=past, ttl_seconds=60)
    assert holds_expire_and_queue(now=timezone.now())["expired"] == 1
    _failed("req-expired")
    # Details the task could not rebuild a RequestDetails from are left out, not passed on.
    _held("req-partial")
    ReconciliationItem.objects.create(
        kind=ReconciliationItem.Kind.DEDUCTION_FAILURE,
        request_id="req-partial",
        cost=COST,
        usage=USAGE.to_dict(),
        details={"stream": True},
        created_at=timezone.now(),
    )

    assert deduction_failures_requeue() == {"enqueued": 3, "skipped": 0, "failed": 0}

    tasks = published.tasks()
    assert tasks == [
        (
            settlement_retry.name,
            settlement_retry_kwargs(
                request_id="req-active", cost=COST, usage=USAGE, details=details
            ),
        ),
        (
            settlement_retry.name,
            settlement_retry_kwargs(request_id="req-expired", cost=COST, usage=USAGE, details=None),
        ),
        (
            settlement_retry.name,
            settlement_retry_kwargs(request_id="req-partial", cost=COST, usage=USAGE, details=None),
        ),
    ]
    # JSON as the task gets it: the details round-trip whole.
    assert tasks[0][1]["details"] == json.loads(json.dumps(details.to_dict()))


def test_failures_already_charged_released_or_without_a_cost_are_skipped(published, sentry_events):
    now = timezone.now()
    _held("req-settled")
    _failed("req-settled")
    hold_settle(request_id="req-settled", cost=COST, usage=USAGE, now=now)
    _held("req-released")
    _failed("req-released")
    hold_release(request_id="req-released", now=now)
    # Expired, then charged by finance from the queue: it has its posting.
    _held("req-charged", now=now - timedelta(hours=1), ttl_seconds=60)
    holds_expire_and_queue(now=now)
    _failed("req-charged")
    request_charge_post(
        request_id="req-charged", cost=COST, memo="charged by finance", now=now, posted_by_id=None
    )
    _failed("req-no-hold")  # a request whose hold was never written
    _held("req-no-cost")
    ReconciliationItem.objects.create(
        kind=ReconciliationItem.Kind.DEDUCTION_FAILURE, request_id="req-no-cost", created_at=now
    )
    # Not pending: finance decided it; the requeue does not even count it.
    _held("req-resolved")
    resolved = _failed("req-resolved")
    resolved.status = ReconciliationItem.Status.WRITTEN_OFF
    resolved.save(update_fields=["status"])
    _held("req-chargeable")
    _failed("req-chargeable")

    assert deduction_failures_requeue() == {"enqueued": 1, "skipped": 5, "failed": 0}

    assert _requeued(published) == ["req-chargeable"]
    assert Hold.objects.get(request_id="req-released").state == Hold.State.RELEASED
    assert LedgerTransaction.objects.filter(request_id="req-settled").count() == 1


def test_the_limit_takes_the_oldest_pending_failures_first(published, sentry_events):
    for request_id in ("req-1", "req-2", "req-3"):
        _held(request_id)
        _failed(request_id)

    assert deduction_failures_requeue(limit=2) == {"enqueued": 2, "skipped": 0, "failed": 0}
    assert _requeued(published) == ["req-1", "req-2"]

    # A skipped item counts against the limit too: it is "at most this many items".
    hold_settle(request_id="req-1", cost=COST, usage=USAGE, now=timezone.now())
    assert deduction_failures_requeue(limit=1) == {"enqueued": 0, "skipped": 1, "failed": 0}
    assert _requeued(published) == []


def test_the_command_prints_its_counts_as_one_json_line(published, sentry_events):
    for request_id in ("req-1", "req-2"):
        _held(request_id)
        _failed(request_id)
    hold_release(request_id="req-1", now=timezone.now())
    out = StringIO()

    call_command("retry_failed_settlements", "--json", stdout=out)

    assert out.getvalue().count("\n") == 1
    assert json.loads(out.getvalue()) == {"enqueued": 1, "skipped": 1, "failed": 0}
    assert _requeued(published) == ["req-2"]

    out = StringIO()
    call_command("retry_failed_settlements", "--json", "--limit", "1", stdout=out)
    assert json.loads(out.getvalue()) == {"enqueued": 0, "skipped": 1, "failed": 0}


def test_with_the_broker_down_each_chargeable_failure_counts_as_failed(sentry_events):
    """The command in a process of its own whose broker refuses connections: nothing could be
    queued, and it says so; the skipped item needs no broker. The items stay pending."""
    _held("req-1")
    _failed("req-1")
    _held("req-2")
    _failed("req-2")
    hold_release(request_id="req-2", now=timezone.now())
    _held("req-3")
    _failed("req-3")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url_of_tests(),
        "REDIS_URL": BROKER_DOWN,
    }

    done = subprocess.run(
        [sys.executable, "manage.py", "retry_failed_settlements", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"enqueued": 0, "skipped": 1, "failed": 2}
    assert "could not queue the settle of request req-1" in done.stderr
    assert (
        ReconciliationItem.objects.filter(
            kind=ReconciliationItem.Kind.DEDUCTION_FAILURE, status=ReconciliationItem.Status.PENDING
        ).count()
        == 3
    )


def test_a_requeued_expired_hold_is_charged_late_once_and_not_queued_again(
    running_worker, sentry_events
):
    """Through the real worker: the settle lands late (the hold had expired), closes the
    failure item, and a second run finds the request charged and skips it."""
    past = timezone.now() - timedelta(hours=1)
    _held("req-late", now=past, ttl_seconds=60)
    holds_expire_and_queue(now=timezone.now())
    item = _failed("req-late", details=_details())

    assert deduction_failures_requeue() == {"enqueued": 1, "skipped": 0, "failed": 0}

    wait_until(lambda: LedgerTransaction.objects.filter(request_id="req-late").exists(), timeout=20)
    wait_until(
        lambda: (
            ReconciliationItem.objects.get(pk=item.pk).status == ReconciliationItem.Status.RESOLVED
        ),
        timeout=10,
    )
    posting = LedgerTransaction.objects.get(request_id="req-late")
    assert posting.is_late
    assert deduction_failures_requeue() == {"enqueued": 0, "skipped": 0, "failed": 0}
    # Pending again (finance reopened it, say): the request is charged, so it is skipped.
    ReconciliationItem.objects.filter(pk=item.pk).update(status=ReconciliationItem.Status.PENDING)
    assert deduction_failures_requeue() == {"enqueued": 0, "skipped": 1, "failed": 0}
    assert LedgerTransaction.objects.filter(request_id="req-late").count() == 1
