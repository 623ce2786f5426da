"""Periodic sweeps: hold expiry into the reconciliation queue, the ledger audit, budget rollover,
and their management commands."""

from __future__ import annotations

import importlib
import json
from datetime import datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from billing.models import Account, ApiKey, Hold, LedgerTransaction
from billing.services.budgets import api_key_budgets_roll
from billing.services.holds import hold_place, hold_settle
from reconciliation.models import ReconciliationItem
from reconciliation.services.sweeps import holds_expire_and_queue, ledger_audit_and_queue
from tests.factories import make_account, make_key

TTL = 60
D = Decimal


def _place(key: ApiKey, request_id: str, amount: str, now: datetime) -> Hold:
    return hold_place(
        api_key=key,
        request_id=request_id,
        amount=D(amount),
        now=now,
        ttl_seconds=TTL,
        model_alias="gpt-test",
    )


@pytest.fixture
def key(issued_key) -> ApiKey:  # type: ignore[no-untyped-def]
    return issued_key.api_key


# --- expiry -----------------------------------------------------------------------------------


def test_sweep_expires_holds_at_their_expiry_in_batches_and_queues_each(key, now):
    for n in range(5):
        _place(key, f"r{n}", "0.5", now)

    result = holds_expire_and_queue(now=now + timedelta(seconds=TTL), batch_size=2)

    assert result == {"expired": 5, "queued": 5}
    assert set(Hold.objects.values_list("state", flat=True)) == {Hold.State.EXPIRED}
    items = ReconciliationItem.objects.order_by("request_id")
    assert [item.request_id for item in items] == ["r0", "r1", "r2", "r3", "r4"]
    assert {item.kind for item in items} == {ReconciliationItem.Kind.EXPIRED_HOLD}
    assert {
        (item.account_id, item.key_prefix, item.model_alias, item.held_amount) for item in items
    } == {(key.account_id, key.prefix, "gpt-test", D("0.5"))}


def test_sweep_gives_the_expired_amounts_back_to_the_account(account, key, now):
    _place(key, "r1", "2", now)
    _place(key, "r2", "3", now)

    holds_expire_and_queue(now=now + timedelta(minutes=5))

    account.refresh_from_db()
    assert (account.balance, account.held) == (D("10"), D("0"))


def test_sweep_never_expires_a_hold_before_its_expiry(key, now):
    _place(key, "r1", "1", now)

    result = holds_expire_and_queue(now=now + timedelta(seconds=TTL) - timedelta(microseconds=1))

    assert result == {"expired": 0, "queued": 0}
    assert Hold.objects.get().state == Hold.State.ACTIVE
    assert not ReconciliationItem.objects.exists()


def test_sweep_leaves_settled_holds_alone(key, now):
    _place(key, "r1", "1", now)
    hold_settle(request_id="r1", cost=D("0.4"), now=now + timedelta(seconds=1))

    result = holds_expire_and_queue(now=now + timedelta(hours=1))

    assert result == {"expired": 0, "queued": 0}
    assert Hold.objects.get().state == Hold.State.SETTLED


def test_a_second_sweep_queues_nothing_twice(key, now):
    _place(key, "r1", "1", now)
    later = now + timedelta(hours=1)
    holds_expire_and_queue(now=later)

    again = holds_expire_and_queue(now=later + timedelta(minutes=1))

    assert again == {"expired": 0, "queued": 0}
    assert ReconciliationItem.objects.count() == 1


def test_late_settle_after_expiry_posts_the_usage_once_and_flags_it(account, key, now):
    _place(key, "r1", "1", now)
    holds_expire_and_queue(now=now + timedelta(seconds=TTL))
    late = now + timedelta(seconds=TTL + 30)

    first = hold_settle(request_id="r1", cost=D("0.6"), now=late)
    again = hold_settle(request_id="r1", cost=D("0.6"), now=late + timedelta(seconds=1))

    assert again.replayed
    posting = LedgerTransaction.objects.get(request_id="r1")
    assert posting.pk == first.transaction_id
    assert posting.is_late
    account.refresh_from_db()
    assert (account.balance, account.held) == (D("9.4"), D("0"))
    assert (
        ReconciliationItem.objects.get(request_id="r1").kind == ReconciliationItem.Kind.EXPIRED_HOLD
    )


def test_expire_holds_command_prints_one_json_line(key):
    _place(key, "r1", "1", timezone.now() - timedelta(hours=1))  # the command uses the real clock
    out = StringIO()

    call_command("expire_holds", "--json", stdout=out)

    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"expired": 1, "queued": 1}


# --- audit ------------------------------------------------------------------------------------


def _corrupt_cached_balance(account: Account, delta: int) -> None:
    # Around the ORM and the services, as a bug or a manual edit would.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE billing_account SET balance = balance + %s WHERE id = %s", [delta, account.pk]
        )


def test_audit_of_a_clean_ledger_queues_nothing(account, now, sentry_events):
    result = ledger_audit_and_queue(now=now)

    assert result["ok"] is True
    assert not ReconciliationItem.objects.exists()
    assert sentry_events == []


def test_audit_mismatch_becomes_one_pending_item_per_account(account, now, sentry_events):
    _corrupt_cached_balance(account, 10**10)  # +1 USD in stored units

    ledger_audit_and_queue(now=now)
    result = ledger_audit_and_queue(now=now + timedelta(days=1))

    assert (result["mismatches"], result["items_created"], result["items_updated"]) == (1, 0, 1)
    item = ReconciliationItem.objects.get()
    assert (item.kind, item.status, item.account_id) == (
        ReconciliationItem.Kind.AUDIT_MISMATCH,
        ReconciliationItem.Status.PENDING,
        account.pk,
    )
    assert item.details["cached_balance"] == "11.0000000000"
    assert item.details["ledger_balance"] == "10.0000000000"


def test_audit_mismatch_raises_a_sentry_error(account, now, sentry_events):
    _corrupt_cached_balance(account, 1)

    ledger_audit_and_queue(now=now)

    assert [event["level"] for event in sentry_events] == ["error"]
    assert "1 accounts out of step" in sentry_events[0]["message"]


# --- budgets ----------------------------------------------------------------------------------


@pytest.fixture
def budget_key(account, now) -> ApiKey:  # type: ignore[no-untyped-def]
    return make_key(account=account, now=now, budget_limit=D("5"), budget_period="day").api_key


def test_budget_rollover_resets_spent_and_keeps_held(budget_key, now):
    _place(budget_key, "spent", "1", now)
    hold_settle(request_id="spent", cost=D("0.7"), now=now)
    hold_place(api_key=budget_key, request_id="open", amount=D("2"), now=now, ttl_seconds=86400)

    rolled = api_key_budgets_roll(now=now + timedelta(days=1))

    budget_key.refresh_from_db()
    assert rolled == 1
    assert (budget_key.budget_spent, budget_key.budget_held) == (D("0"), D("2"))
    assert budget_key.budget_period_start == (now + timedelta(days=1)).replace(hour=0)


def test_budget_rollover_leaves_keys_in_their_current_period_alone(budget_key, now):
    _place(budget_key, "spent", "1", now)
    hold_settle(request_id="spent", cost=D("0.7"), now=now)

    rolled = api_key_budgets_roll(now=now + timedelta(hours=1))

    budget_key.refresh_from_db()
    assert rolled == 0
    assert budget_key.budget_spent == D("0.7")


def test_roll_key_budgets_command_prints_one_json_line(budget_key):
    long_ago = timezone.now() - timedelta(days=40)  # the command uses the real clock
    _place(budget_key, "spent", "1", long_ago)
    hold_settle(request_id="spent", cost=D("0.7"), now=long_ago)
    out = StringIO()

    call_command("roll_key_budgets", "--json", stdout=out)

    assert json.loads(out.getvalue()) == {"rolled": 1}


def test_other_account_keys_without_a_budget_are_never_rolled(account, now):
    make_key(account=make_account(), now=now)

    assert api_key_budgets_roll(now=now) == 0


# --- default schedules ------------------------------------------------------------------------


@pytest.mark.django_db
def test_default_beat_schedules_install_once_and_name_the_sweep_tasks():
    from django.apps import apps
    from django_celery_beat.models import PeriodicTask

    migration = importlib.import_module("reconciliation.migrations.0003_default_beat_schedules")
    PeriodicTask.objects.all().delete()  # the test database was flushed of the migrated rows

    migration.beat_schedules_install(apps, None)
    migration.beat_schedules_install(apps, None)

    tasks = dict(PeriodicTask.objects.values_list("task", "enabled"))
    assert tasks == {
        "reconciliation.expire_holds": True,
        "reconciliation.audit_ledger": True,
        "reconciliation.budgets_roll": True,
    }
    expire = PeriodicTask.objects.get(task="reconciliation.expire_holds")
    assert (expire.interval.every, expire.interval.period) == (1, "minutes")
    audit = PeriodicTask.objects.get(task="reconciliation.audit_ledger")
    assert (audit.crontab.minute, audit.crontab.hour) == ("0", "3")


def test_every_scheduled_task_is_registered_with_celery():
    from config.celery import app

    migration = importlib.import_module("reconciliation.migrations.0003_default_beat_schedules")
    app.loader.import_default_modules()

    for task, _schedule, _options in migration.DEFAULT_TASKS.values():
        assert task in app.tasks


@pytest.mark.django_db
def test_the_sweep_writes_few_index_entries_per_item_and_lookups_still_use_an_index() -> None:
    # One item per expired hold: each index on the table is an entry written per hold.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s ORDER BY 1",
            [ReconciliationItem._meta.db_table],
        )
        indexes = [row[0] for row in cursor.fetchall()]
        cursor.execute("SET LOCAL enable_seqscan = off")  # what an index can serve, at any size
        by_request = ReconciliationItem.objects.filter(
            kind=ReconciliationItem.Kind.EXPIRED_HOLD, request_id="req-1"
        ).explain()
        by_user = ReconciliationItem.objects.filter(resolved_by_id=1).explain()
    assert len(indexes) == 6, indexes  # pk, (kind, request_id), account, (status, kind, created)
    assert "one_item_per_request_and_kind" in by_request
    assert "item_resolved_by" in by_user  # and the two partial foreign-key indexes
