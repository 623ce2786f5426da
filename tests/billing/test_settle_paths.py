"""The settle, as the engine writes it: one call of billing_engine.hold_settle, which leaves
exactly these money, hold, ledger and usage rows (a key with a budget the same ones, plus its
budget figures), replays and refuses in the same statement, and is prepared once per
connection."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing import services
from billing.errors import (
    HoldAlreadyResolved,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
)
from billing.models import SYSTEM_ACCOUNT_IDS, Account, ApiKey, Hold, LedgerTransaction, UsageRecord
from billing.pricing import Usage
from billing.selectors import ledger_audit
from billing.services.holds import RequestDetails, hold_place, hold_release, hold_settle
from tests.billing.test_engine import legacy_posting_hash
from tests.factories import make_account, make_key, request_key

pytestmark = pytest.mark.django_db

D = Decimal
TTL = 60
REVENUE = SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE]
USAGE = Usage(input_tokens=11, cached_input_tokens=3, output_tokens=7, reasoning_tokens=2)


def _details(now: datetime) -> RequestDetails:
    return RequestDetails(
        endpoint="chat.completions",
        started_at=now,
        stream=True,
        outcome="completed",
        first_byte_ms=12,
        duration_ms=345,
        provider_cost=D("0.3125"),  # recorded beside the cost, never posted
    )


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The engine statements the hold services run (each is one round trip)."""
    calls: list[str] = []
    real = services.holds.sql_rows

    def counted(statement: str, params: Any) -> Any:
        calls.append(statement)
        return real(statement, params)

    monkeypatch.setattr(services.holds, "sql_rows", counted)
    return calls


def _settle_on(
    *, budgeted: bool, request_id: str, cost: str, settle_after: int, now: datetime
) -> tuple[Account, ApiKey, Any, int]:
    """Returns (account, key, settle result, ORM queries the settle ran)."""
    account = make_account(credits=D("10"), now=now)
    options: dict[str, Any] = (
        {"budget_limit": D("1000"), "budget_period": "month"} if budgeted else {}
    )
    key = make_key(account=account, now=now, **options).api_key
    hold_place(
        api_key=key,
        request_id=request_id,
        amount=D("2"),
        now=now,
        model_alias="gpt-test",
        ttl_seconds=TTL,
    )
    with CaptureQueriesContext(connection) as orm_queries:
        result = hold_settle(
            request_id=request_id,
            cost=D(cost),
            now=now + timedelta(seconds=settle_after),
            usage=USAGE,
            details=_details(now),
        )
    # The engine call runs on a psycopg cursor (billing/engine.py), unseen by the ORM.
    statements = [q for q in orm_queries if "SAVEPOINT" not in q["sql"]]
    return account, key, result, len(statements)


def _rows(account: Account, request_id: str) -> dict[str, Any]:
    """What a settle wrote, with the ids that differ between two accounts taken out."""
    account.refresh_from_db()
    hold = Hold.objects.get(request_id=request_id)
    txn = LedgerTransaction.objects.filter(request_id=request_id).first()
    ids = {"id", "request_id", "account_id", "api_key_id"}
    record = {
        field: value
        for field, value in UsageRecord.objects.values().get(request_id=request_id).items()
        if field not in ids
    }
    rows: dict[str, Any] = {
        "balance": account.balance,
        "held": account.held,
        "hold": (
            hold.state,
            hold.resolved_at,
            hold.settled_amount,
            hold.is_overrun,
            hold.is_late,
            hold.transaction_id == (txn.pk if txn else None),
        ),
        "usage_record": record,
        "transaction": None,
    }
    if txn is not None:
        legs = [(leg.account_id, leg.amount) for leg in txn.legs.all()]
        expected_hash = legacy_posting_hash(
            kind=txn.kind, legs=legs, request_id=request_id, reverses=None
        )
        rows["transaction"] = (
            txn.kind,
            txn.idempotency_key == request_key(request_id),
            txn.content_hash == expected_hash,
            txn.occurred_at,
            txn.posted_at,
            txn.model_alias,
            txn.memo,
            txn.posted_by_id,
            txn.is_overrun,
            txn.is_late,
            sorted(
                ("customer" if account_id == account.pk else str(account_id), amount)
                for account_id, amount in legs
            ),
        )
    return rows


def _expected_rows(*, cost: str, settle_after: int, now: datetime) -> dict[str, Any]:
    settled_at = now + timedelta(seconds=settle_after)
    charged = D(cost)
    overrun, late = charged > 2, settle_after >= TTL
    return {
        "balance": D(10) - charged,
        "held": D(0),
        "hold": (Hold.State.SETTLED, settled_at, charged, overrun, late, True),
        "usage_record": {
            "model_alias": "gpt-test",
            "endpoint": "chat.completions",
            "stream": True,
            "input_tokens": 11,
            "cached_input_tokens": 3,
            "cache_write_tokens": 0,
            "output_tokens": 7,
            "reasoning_tokens": 2,
            "estimated": False,
            "cost": charged,
            "provider_cost": D("0.3125"),
            "status": UsageRecord.Status.SETTLED,
            "outcome": "completed",
            "started_at": now,
            "first_byte_ms": 12,
            "duration_ms": 345,
            "created_at": settled_at,
        },
        "transaction": None
        if charged == 0
        else (
            LedgerTransaction.Kind.USAGE,
            True,  # the request's one key
            True,  # the content hash the Python services computed
            now,  # occurred when the hold was placed
            settled_at,
            "gpt-test",
            "",
            None,
            overrun,
            late,
            sorted([("customer", -charged), (str(REVENUE), charged)]),
        ),
    }


@pytest.mark.parametrize(
    ("cost", "settle_after"),
    [
        ("0.75", 5),  # the common case
        ("0", 5),  # nothing to post, the hold still resolves
        ("2.5", 5),  # overrun: posted in full and flagged
        ("0.75", TTL + 1),  # past expiry but not yet swept: flagged late
    ],
)
def test_a_settle_writes_exactly_its_rows_with_or_without_a_budget(
    now: datetime, cost: str, settle_after: int, engine_calls: list[str]
) -> None:
    plain_account, _, plain, plain_orm_queries = _settle_on(
        budgeted=False, request_id="plain", cost=cost, settle_after=settle_after, now=now
    )
    budgeted_account, budgeted_key, budgeted, budgeted_orm_queries = _settle_on(
        budgeted=True, request_id="budgeted", cost=cost, settle_after=settle_after, now=now
    )

    expected = _expected_rows(cost=cost, settle_after=settle_after, now=now)
    assert _rows(plain_account, "plain") == expected
    assert _rows(budgeted_account, "budgeted") == expected
    for result in (plain, budgeted):
        assert (result.cost, result.is_overrun, result.is_late, result.replayed) == (
            D(cost),
            D(cost) > 2,
            settle_after >= TTL,
            False,
        )
        assert (result.transaction_id is None) == (D(cost) == 0)
    # One engine call each (a place and a settle per key), and no ORM query in the settle.
    assert [call.split("(")[0] for call in engine_calls] == [
        "SELECT * FROM billing_engine.hold_place",
        "SELECT * FROM billing_engine.hold_settle",
    ] * 2
    assert (plain_orm_queries, budgeted_orm_queries) == (0, 0)
    budgeted_key.refresh_from_db()
    assert budgeted_key.budget_held == 0 and budgeted_key.budget_spent == D(cost)
    assert ledger_audit().clean


def test_a_settle_replays_and_refuses_in_its_one_statement(
    now: datetime, engine_calls: list[str]
) -> None:
    account, _, first, _ = _settle_on(
        budgeted=False, request_id="r1", cost="0.75", settle_after=5, now=now
    )
    written = _rows(account, "r1")
    engine_calls.clear()

    again = hold_settle(request_id="r1", cost=D("0.75"), now=now + timedelta(seconds=9))
    assert again.replayed and again.transaction_id == first.transaction_id
    assert (again.cost, again.hold.settled_amount) == (D("0.75"), D("0.75"))
    with pytest.raises(IdempotencyConflict) as conflict:
        hold_settle(request_id="r1", cost=D("0.5"), now=now + timedelta(seconds=9))
    assert conflict.value.charged == D("0.75")  # what the customer was actually charged
    with pytest.raises(HoldNotFound):
        hold_settle(request_id="never-held", cost=D("0.5"), now=now)
    with pytest.raises(InvalidAmount):
        hold_settle(request_id="r1", cost=D("-0.5"), now=now)

    assert len(engine_calls) == 3  # the negative cost never reached the engine
    assert _rows(account, "r1") == written  # the settle's rows exactly, and nothing else
    assert LedgerTransaction.objects.filter(request_id="r1").count() == 1
    assert not UsageRecord.objects.filter(request_id="never-held").exists()
    assert ledger_audit().clean


def test_a_settle_of_a_released_hold_charges_nothing(
    account: Account, issued_key: Any, now: datetime
) -> None:
    hold_place(api_key=issued_key.api_key, request_id="r1", amount=D(1), now=now)
    hold_release(request_id="r1", now=now)
    with pytest.raises(HoldAlreadyResolved) as refused:
        hold_settle(request_id="r1", cost=D("0.5"), now=now, usage=USAGE, details=_details(now))
    assert (refused.value.state, refused.value.charged) == ("released", D(0))
    assert not LedgerTransaction.objects.filter(request_id="r1").exists()
    assert not UsageRecord.objects.filter(request_id="r1").exists()
    assert Hold.objects.get(request_id="r1").state == Hold.State.RELEASED
    account.refresh_from_db()
    assert (account.balance, account.held) == (D(10), D(0))


def test_a_settle_writes_null_timings_and_skips_the_record_without_details(
    account: Account, issued_key: Any, now: datetime
) -> None:
    key = issued_key.api_key
    for request_id in ("no-first-byte", "no-details"):
        hold_place(api_key=key, request_id=request_id, amount=D("1"), now=now, ttl_seconds=TTL)
    hold_settle(
        request_id="no-first-byte",
        cost=D("0.1"),
        now=now,
        usage=Usage(input_tokens=5),
        details=RequestDetails(endpoint="messages", started_at=now, outcome="upstream_timeout"),
    )
    hold_settle(request_id="no-details", cost=D("0.2"), now=now)

    record = UsageRecord.objects.get(request_id="no-first-byte")
    assert (record.first_byte_ms, record.duration_ms, record.outcome) == (
        None,
        None,
        "upstream_timeout",
    )
    assert record.api_key_id == key.pk and record.cost == D("0.1")
    assert not UsageRecord.objects.filter(request_id="no-details").exists()
    account.refresh_from_db()
    assert (account.balance, account.held) == (D("9.7"), D(0))
    assert ledger_audit().clean


@pytest.mark.django_db(transaction=True)
def test_engine_calls_in_autocommit_write_all_or_nothing(now: datetime) -> None:
    """Outside any transaction (as in the gateway) each engine call is its own transaction:
    a refused hold leaves nothing, a replay returns the original."""
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key
    assert not connection.in_atomic_block

    with pytest.raises(InsufficientFunds):
        hold_place(api_key=key, request_id="too-big", amount=D("1.5"), now=now)
    first = hold_place(api_key=key, request_id="r1", amount=D("0.6"), now=now)
    again = hold_place(api_key=key, request_id="r1", amount=D("0.6"), now=now)
    with pytest.raises(IdempotencyConflict):
        hold_place(api_key=key, request_id="r1", amount=D("0.7"), now=now)
    settled = hold_settle(request_id="r1", cost=D("0.25"), now=now)
    replayed = hold_settle(request_id="r1", cost=D("0.25"), now=now)

    assert again.pk == first.pk
    assert not Hold.objects.filter(request_id="too-big").exists()
    assert settled.transaction_id is not None and not settled.replayed
    assert replayed.replayed and replayed.transaction_id == settled.transaction_id
    account.refresh_from_db()
    assert (account.balance, account.held) == (D("0.75"), D(0))
    assert ledger_audit().clean


def test_hot_statements_are_prepared_once_per_connection(
    account: Account, issued_key: Any, now: datetime
) -> None:
    """Django disables prepared statements unless OPTIONS asks for them: without
    prepare_threshold set, prepare=True was silently ignored and PostgreSQL parsed and planned
    both statements on every request."""
    key = issued_key.api_key
    for n in range(3):
        hold_place(api_key=key, request_id=f"p{n}", amount=D("0.1"), now=now, ttl_seconds=TTL)
        hold_settle(request_id=f"p{n}", cost=D("0.01"), now=now)
        hold_place(api_key=key, request_id=f"q{n}", amount=D("0.1"), now=now, ttl_seconds=TTL)
        hold_release(request_id=f"q{n}", now=now)

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements"
            " WHERE NOT from_sql"
        )
        prepared = cursor.fetchall()
    for function, runs in [("hold_place", 6), ("hold_settle", 3), ("hold_release", 3)]:
        [(_, executions)] = [row for row in prepared if f"billing_engine.{function}(" in row[0]]
        assert executions >= runs  # earlier tests on this connection ran it too


def test_the_holds_the_engine_returns_are_the_rows_it_wrote(now: datetime) -> None:
    account = make_account(credits=D("10"), now=now)
    key = make_key(account=account, now=now).api_key
    columns = [field.attname for field in Hold._meta.concrete_fields]

    def row(hold: Hold) -> list[Any]:
        return [getattr(hold, name) for name in columns]

    placed = hold_place(api_key=key, request_id="r1", amount=D("2"), now=now, ttl_seconds=TTL)
    with CaptureQueriesContext(connection) as queries:
        placed_row, placed_key = row(placed), placed.api_key
    assert len(queries) == 0  # built from the engine's own row: nothing deferred
    assert placed_row == row(Hold.objects.get(request_id="r1"))
    assert placed_key is key and not placed._state.adding
    settled = hold_settle(request_id="r1", cost=D("0.5"), now=now, usage=Usage()).hold
    assert row(settled) == row(Hold.objects.get(request_id="r1"))
    assert settled.state == Hold.State.SETTLED and settled.transaction_id is not None
    hold_place(api_key=key, request_id="r2", amount=D("1"), now=now, ttl_seconds=TTL)
    released = hold_release(request_id="r2", now=now)
    assert row(released) == row(Hold.objects.get(request_id="r2"))
    assert released.state == Hold.State.RELEASED


# --- what the settle reads -----------------------------------------------------------------------


@pytest.fixture
def nested_plans() -> Iterator[list[dict[str, Any]]]:
    """The plan, with actual rows, of every statement run inside the engine's functions while
    the test runs (auto_explain, sent to this session as notices; undone with the test's
    transaction)."""
    plans: list[dict[str, Any]] = []

    def collect(diagnostic: Any) -> None:
        message = diagnostic.message_primary or ""
        if "plan:" in message:
            plans.append(json.loads(message.split("plan:", 1)[1]))

    with connection.cursor() as cursor:
        cursor.execute("LOAD 'auto_explain'")
        for name, value in [
            ("log_min_duration", "0"),
            ("log_nested_statements", "on"),
            ("log_analyze", "on"),
            ("log_format", "json"),
            ("log_level", "notice"),
        ]:
            cursor.execute(f"SET LOCAL auto_explain.{name} = '{value}'")
    pg = connection.connection
    pg.add_notice_handler(collect)
    try:
        yield plans
    finally:
        pg.remove_notice_handler(collect)
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL auto_explain.log_min_duration = -1")


def _hold_scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if plan.get("Relation Name") == "billing_hold":
        yield plan
    for child in plan.get("Plans", []):
        yield from _hold_scans(child)


@pytest.mark.parametrize("step", ["settle", "release"])
def test_a_settle_or_release_reads_only_its_own_hold(
    now: datetime, nested_plans: list[dict[str, Any]], step: str
) -> None:
    """However many holds the account has active. With the statistics of a working system
    (active holds rare, each account's few), the old settle's lock walked the account's
    (account_id, state) index, reading every active hold of the account: a cost that grew with
    the customer's concurrency (here 300 requests in flight on one account)."""
    account = make_account(credits=D("100"), now=now)
    key = make_key(account=account, now=now).api_key
    for i in range(300):
        hold_place(api_key=key, request_id=f"done-{i}", amount=D("0.01"), now=now, ttl_seconds=TTL)
    Hold.objects.filter(request_id__startswith="done-").update(
        state=Hold.State.RELEASED, resolved_at=now
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE billing_hold")  # what autovacuum would have seen
    for i in range(300):
        hold_place(api_key=key, request_id=f"busy-{i}", amount=D("0.01"), now=now, ttl_seconds=TTL)
    nested_plans.clear()

    if step == "settle":
        hold_settle(request_id="busy-150", cost=D("0.005"), now=now, usage=Usage(input_tokens=1))
    else:
        hold_release(request_id="busy-150", now=now)

    scans = [scan for plan in nested_plans for scan in _hold_scans(plan["Plan"])]
    assert scans, "auto_explain saw no statement on billing_hold"
    for scan in scans:
        assert scan["Node Type"] != "Seq Scan", scan
        assert scan.get("Rows Removed by Filter", 0) == 0, scan
        assert scan["Actual Rows"] <= 1, scan
    expected = Hold.State.SETTLED if step == "settle" else Hold.State.RELEASED
    assert Hold.objects.get(request_id="busy-150").state == expected
