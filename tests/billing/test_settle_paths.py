"""The one-statement settle (PostgreSQL, key without a budget) and the general ORM path (a key
with a budget takes it) must leave identical money, hold, ledger and usage rows."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.errors import IdempotencyConflict, InsufficientFunds
from billing.models import Account, ApiKey, Hold, LedgerTransaction, UsageRecord
from billing.pricing import Usage
from billing.selectors import ledger_audit
from billing.services.holds import RequestDetails, hold_place, hold_settle
from billing.services.ledger import Leg, Posting
from tests.factories import make_account, make_key

pytestmark = pytest.mark.django_db

D = Decimal
TTL = 60


def _settle_on(
    *,
    budgeted: bool,
    request_id: str,
    cost: str,
    settle_after: int,
    now: datetime,
    account_hint: str = "none",
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
    settled_at = now + timedelta(seconds=settle_after)
    hints = {"none": None, "right": account.pk, "wrong": account.pk + 10_000}
    with CaptureQueriesContext(connection) as orm_queries:
        result = hold_settle(
            account_id=hints[account_hint],
            request_id=request_id,
            cost=D(cost),
            now=settled_at,
            usage=Usage(
                input_tokens=11, cached_input_tokens=3, output_tokens=7, reasoning_tokens=2
            ),
            details=RequestDetails(
                endpoint="chat.completions",
                started_at=now,
                stream=True,
                outcome="completed",
                first_byte_ms=12,
                duration_ms=345,
            ),
        )
    # The one statement runs on a psycopg cursor (billing/sql.py), unseen by the ORM.
    statements = [q for q in orm_queries if "SAVEPOINT" not in q["sql"]]
    return account, key, result, len(statements)


def _rows(account: Account, request_id: str) -> dict[str, Any]:
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
        expected_hash = Posting(
            kind=txn.kind,
            legs=[Leg(account_id=leg.account_id, amount=leg.amount) for leg in txn.legs.all()],
            idempotency_key=txn.idempotency_key,
            occurred_at=txn.occurred_at,
            request_id=request_id,
        ).content_hash
        rows["transaction"] = (
            txn.kind,
            txn.idempotency_key == f"request:{request_id}",
            txn.content_hash == expected_hash,
            txn.occurred_at,
            txn.posted_at,
            txn.model_alias,
            txn.memo,
            txn.posted_by_id,
            txn.is_overrun,
            txn.is_late,
            sorted(
                ("customer" if leg.account_id == account.pk else str(leg.account_id), leg.amount)
                for leg in txn.legs.all()
            ),
        )
    return rows


@pytest.mark.parametrize(
    ("cost", "settle_after"),
    [
        ("0.75", 5),  # the common case
        ("0", 5),  # nothing to post, the hold still resolves
        ("2.5", 5),  # overrun: posted in full and flagged
        ("0.75", TTL + 1),  # past expiry but not yet swept: flagged late
    ],
)
@pytest.mark.parametrize("account_hint", ["none", "right", "wrong"])
def test_one_statement_settle_matches_the_general_path(
    now: datetime, cost: str, settle_after: int, account_hint: str
) -> None:
    # A wrong account hint makes the one statement match nothing: the general path settles.
    fast_account, _, fast, fast_orm_queries = _settle_on(
        budgeted=False,
        request_id="fast",
        cost=cost,
        settle_after=settle_after,
        now=now,
        account_hint=account_hint,
    )
    general_account, general_key, general, _ = _settle_on(
        budgeted=True, request_id="general", cost=cost, settle_after=settle_after, now=now
    )

    assert _rows(fast_account, "fast") == _rows(general_account, "general")
    assert (fast.cost, fast.is_overrun, fast.is_late, fast.replayed) == (
        general.cost,
        general.is_overrun,
        general.is_late,
        general.replayed,
    )
    assert (fast.transaction_id is None) == (D(cost) == 0)
    if account_hint == "wrong":
        assert fast_orm_queries > 1  # the general path
    else:
        # The one statement (after a raw account lookup when the caller gave no hint).
        assert fast_orm_queries == 0
    general_key.refresh_from_db()
    assert general_key.budget_held == 0 and general_key.budget_spent == D(cost)
    assert ledger_audit().clean


def test_one_statement_settle_replays_and_conflicts_like_the_general_path(now: datetime) -> None:
    account, _, first, _ = _settle_on(
        budgeted=False, request_id="r1", cost="0.75", settle_after=5, now=now
    )
    again = hold_settle(request_id="r1", cost=D("0.75"), now=now + timedelta(seconds=9))
    assert again.replayed and again.transaction_id == first.transaction_id
    assert LedgerTransaction.objects.filter(request_id="r1").count() == 1
    account.refresh_from_db()
    assert (account.balance, account.held) == (D("9.25"), D(0))


def test_one_statement_settle_writes_null_timings_and_skips_the_record_without_details(
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
def test_one_statement_steps_in_autocommit_write_all_or_nothing(now: datetime) -> None:
    """Outside any transaction (as in the gateway) each one-statement step is its own
    transaction: a refused hold leaves nothing, a replay returns the original."""
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key
    assert not connection.in_atomic_block

    with pytest.raises(InsufficientFunds):
        hold_place(api_key=key, request_id="too-big", amount=D("1.5"), now=now)
    first = hold_place(api_key=key, request_id="r1", amount=D("0.6"), now=now)
    again = hold_place(api_key=key, request_id="r1", amount=D("0.6"), now=now)
    with pytest.raises(IdempotencyConflict):
        hold_place(api_key=key, request_id="r1", amount=D("0.7"), now=now)
    settled = hold_settle(request_id="r1", cost=D("0.25"), now=now, account_id=account.pk)
    replayed = hold_settle(request_id="r1", cost=D("0.25"), now=now, account_id=account.pk)

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
        hold_settle(request_id=f"p{n}", cost=D("0.01"), now=now, account_id=account.pk)

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT statement FROM pg_prepared_statements WHERE NOT from_sql ORDER BY name"
        )
        prepared = [row[0] for row in cursor.fetchall()]
    assert len([s for s in prepared if "INSERT INTO billing_hold" in s]) == 1
    assert len([s for s in prepared if "INSERT INTO billing_ledgertransaction" in s]) == 1


def test_the_holds_the_one_statements_return_are_the_rows_they_wrote(now: datetime) -> None:
    account = make_account(credits=D("10"), now=now)
    key = make_key(account=account, now=now).api_key
    columns = [field.attname for field in Hold._meta.concrete_fields]

    def row(hold: Hold) -> list[Any]:
        return [getattr(hold, name) for name in columns]

    placed = hold_place(api_key=key, request_id="r1", amount=D("2"), now=now, ttl_seconds=TTL)
    with CaptureQueriesContext(connection) as queries:
        placed_row, placed_key = row(placed), placed.api_key
    assert len(queries) == 0  # built from the statement's own row: nothing deferred
    assert placed_row == row(Hold.objects.get(request_id="r1"))
    assert placed_key is key and not placed._state.adding
    settled = hold_settle(
        request_id="r1", account_id=account.pk, cost=D("0.5"), now=now, usage=Usage()
    ).hold
    assert row(settled) == row(Hold.objects.get(request_id="r1"))
    assert settled.state == Hold.State.SETTLED and settled.transaction_id is not None


def _hold_rows_filtered_out(plan: dict[str, Any]) -> int:
    """Rows of billing_hold a plan's scans read and then discarded, over the whole plan."""
    is_hold = plan.get("Relation Name") == "billing_hold"
    own = plan.get("Rows Removed by Filter", 0) if is_hold else 0
    return own + sum(_hold_rows_filtered_out(child) for child in plan.get("Plans", []))


def test_the_one_statement_settle_reads_only_its_own_hold(now: datetime) -> None:
    """However many holds the account has active. With the statistics of a working system
    (active holds rare, each account's few), the settle's lock walked the account's
    (account_id, state) index, reading every active hold of the account: a cost that grew with
    the customer's concurrency (here 300 requests in flight on one account)."""
    from billing.services.holds import _SETTLE_SQL, _settle_params

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
    params = _settle_params(
        request_id="busy-150",
        account_id=account.pk,
        cost=D("0.005"),
        now=now,
        usage=Usage(input_tokens=1, output_tokens=1),
        details=None,
    )
    # Bound on the server, as billing/sql.py runs it.
    with psycopg.Cursor(connection.connection) as server_bound:
        server_bound.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + _SETTLE_SQL, params)
        [[[explained]]] = server_bound.fetchall()

    assert _hold_rows_filtered_out(explained["Plan"]) == 0
    assert Hold.objects.get(request_id="busy-150").state == Hold.State.SETTLED
