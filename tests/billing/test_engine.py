"""The money engine itself (billing/sql/engine_0001.sql, the billing_engine schema): what it
must agree with outside it (the content hash stored postings carry, the system account ids,
the Hold model), what the database refuses whoever writes, and its install and removal by the
migrations."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from django.core.management import call_command
from django.db import ProgrammingError, connection
from django.db.migrations.executor import MigrationExecutor
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.engine import ENGINE_SQL_DIR
from billing.models import SYSTEM_ACCOUNT_IDS, Account, Hold, LedgerLeg, LedgerTransaction
from billing.money import from_units, money_str, to_units
from billing.selectors import ledger_audit
from billing.services.holds import (
    HOLD_RESULT_COLUMNS,
    hold_place,
    hold_settle,
    request_write_off_post,
)
from tests.factories import make_account, make_key
from tests.workers import database_url_of_tests

D = Decimal
REVENUE = SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE]
PROMOTIONS = SYSTEM_ACCOUNT_IDS[Account.Kind.PROMOTIONS]
WRITE_OFFS = SYSTEM_ACCOUNT_IDS[Account.Kind.WRITE_OFFS]
UNITS = 10**10  # money columns are bigint units of 1e-10 USD


def legacy_posting_hash(
    *, kind: str, legs: Sequence[tuple[int, Decimal]], request_id: str, reverses: int | None
) -> str:
    """The content hash as the Python services computed it before the engine (Posting.
    content_hash): the hashes already stored were made this way, and a replay of one of those
    postings is recognised only if the engine computes the same bytes."""
    content = {
        "kind": kind,
        "legs": sorted((account_id, money_str(amount)) for account_id, amount in legs),
        "request_id": request_id,
        "reverses": reverses,
    }
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def engine_posting_hash(
    *, kind: str, legs: Sequence[tuple[int, Decimal]], request_id: str, reverses: int | None
) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT billing_engine.posting_hash(%s, %s::bigint[], %s::bigint[], %s, %s)",
            [
                kind,
                [account_id for account_id, _ in legs],
                [to_units(amount) for _, amount in legs],
                request_id,
                reverses,
            ],
        )
        [[digest]] = cursor.fetchall()
    return str(digest)


# --- (a) the content hash: the bytes of the old Python definition --------------------------------

# Computed with the Python code the engine replaced.
HASH_VECTORS = [
    pytest.param(
        "usage", [(7, D("-0.5")), (-1, D("0.5"))], "req_abc", None,
        "de0afe0599a8a258d839009f84d90a0daa4f629d472c09c7359174dfc8700e23",
        id="usage",
    ),
    pytest.param(
        "grant", [(12, D(25)), (-2, D(-25))], "", None,
        "b111331f5987571860a94bfb234832a343282c8fe73240f0821af9fa32b66235",
        id="grant",
    ),
    pytest.param(
        "reversal", [(12, D(-25)), (-2, D(25))], "", 41,
        "16fd4257b05f0e629ca214b1c32cdff7036fc121a956fe41169e08883bd7c1dc",
        id="reversal",
    ),
    pytest.param(
        "adjustment", [(3, D("-0.0000000001")), (-1, D("0.0000000001"))], 'a"b\\c\n', None,
        "a6a02dfad89197babb53695ea99351cc62368101566c57ae58f23a210803b7fa",
        id="adjustment-smallest-unit-escaped-request-id",
    ),
    pytest.param(
        "write_off",
        [(-1, D("922337203.6854775807")), (-3, D("-922337203.6854775807"))],
        "r1",
        None,
        "6dfb4306dc48609938854a92bd4941e3a1e4d6cc302e3fd5bd261622f08ec0da",
        id="write-off-largest-bigint",
    ),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("kind", "legs", "request_id", "reverses", "expected"), HASH_VECTORS)
def test_posting_hash_gives_the_bytes_of_the_python_definition(
    kind: str,
    legs: list[tuple[int, Decimal]],
    request_id: str,
    reverses: int | None,
    expected: str,
) -> None:
    args: dict[str, Any] = {
        "kind": kind, "legs": legs, "request_id": request_id, "reverses": reverses
    }
    assert legacy_posting_hash(**args) == expected  # the vector is the old code's
    assert engine_posting_hash(**args) == expected
    # The legs' order is not part of the identity.
    assert engine_posting_hash(**{**args, "legs": legs[::-1]}) == expected


# Printable ASCII and the control characters JSON escapes (both sides agree on these).
ASCII_TEXT = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x7E), max_size=30
)
LEG = st.tuples(
    st.integers(min_value=-4, max_value=10**12).filter(lambda account_id: account_id != 0),
    st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    .filter(lambda units: units != 0)
    .map(from_units),
)


@pytest.mark.django_db
@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([kind for kind, _ in LedgerTransaction.Kind.choices]),
    legs=st.lists(LEG, min_size=2, max_size=5),
    request_id=ASCII_TEXT,
    reverses=st.none() | st.integers(min_value=1, max_value=2**63 - 1),
)
def test_posting_hash_agrees_with_the_python_definition_on_any_ascii_posting(
    kind: str, legs: list[tuple[int, Decimal]], request_id: str, reverses: int | None
) -> None:
    # Duplicate accounts and legs included: ties sort by the amount's text, byte by byte.
    args: dict[str, Any] = {
        "kind": kind, "legs": legs, "request_id": request_id, "reverses": reverses
    }
    assert engine_posting_hash(**args) == legacy_posting_hash(**args)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "request_id", ["caf\u00e9", "\U0001f600", "\x7f", "\u2028", 'a"\\\x01\n\u00ff']
)
def test_posting_hash_agrees_with_the_python_definition_beyond_ascii(request_id: str) -> None:
    args: dict[str, Any] = {
        "kind": "usage", "legs": [(7, D("-0.5")), (-1, D("0.5"))], "request_id": request_id,
        "reverses": None,
    }
    assert engine_posting_hash(**args) == legacy_posting_hash(**args)


@pytest.mark.django_db
def test_a_posting_stores_the_hash_of_its_legs(account: Account, now: datetime) -> None:
    key = make_key(account=account, now=now).api_key
    hold_place(api_key=key, request_id="r1", amount=D(2), now=now, model_alias="m")
    settled = hold_settle(request_id="r1", cost=D("0.75"), now=now)
    txn = LedgerTransaction.objects.get(pk=_posted(settled.transaction_id))
    legs = [(leg.account_id, leg.amount) for leg in txn.legs.all()]
    assert txn.content_hash == legacy_posting_hash(
        kind="usage", legs=legs, request_id="r1", reverses=None
    )


# --- (b) the system accounts the SQL names by id ------------------------------------------------


def test_the_system_account_ids_are_the_ones_the_engine_hard_codes() -> None:
    assert SYSTEM_ACCOUNT_IDS == {
        Account.Kind.REVENUE: -1,
        Account.Kind.PROMOTIONS: -2,
        Account.Kind.WRITE_OFFS: -3,
        Account.Kind.PAYMENTS: -4,
    }
    # Every negative id written into the engine's SQL is one of them.
    sql = "\n".join(path.read_text() for path in sorted(ENGINE_SQL_DIR.glob("*.sql")))
    literal_ids = {
        int(found)
        for array in re.findall(r"ARRAY\[([^\]]*)\]", sql)
        for found in re.findall(r"(?<![\w.])-\d+", array)
    }
    assert literal_ids
    assert literal_ids <= set(SYSTEM_ACCOUNT_IDS.values())


@pytest.mark.django_db
def test_usage_and_write_off_legs_land_on_the_revenue_and_write_off_accounts(
    account: Account, now: datetime
) -> None:
    key = make_key(account=account, now=now).api_key
    hold_place(api_key=key, request_id="used", amount=D(2), now=now)
    usage = hold_settle(request_id="used", cost=D("0.75"), now=now)
    hold_place(api_key=key, request_id="lost", amount=D(1), now=now)
    write_off = request_write_off_post(
        request_id="lost", amount=D("0.4"), memo="uncollectable", now=now, posted_by_id=None
    )
    no_hold = request_write_off_post(
        request_id="no-hold", amount=D("0.1"), memo="uncollectable", now=now, posted_by_id=None
    )

    def legs(transaction_id: int | None) -> dict[str, Decimal]:
        return {
            leg.account.kind: leg.amount
            for leg in LedgerLeg.objects.filter(transaction_id=transaction_id).select_related(
                "account"
            )
        }

    assert legs(usage.transaction_id) == {
        Account.Kind.CUSTOMER: D("-0.75"),
        Account.Kind.REVENUE: D("0.75"),
    }
    assert legs(write_off.transaction_id) == {
        Account.Kind.REVENUE: D("0.4"),
        Account.Kind.WRITE_OFFS: D("-0.4"),
    }
    assert legs(no_hold.transaction_id) == {
        Account.Kind.REVENUE: D("0.1"),
        Account.Kind.WRITE_OFFS: D("-0.1"),
    }
    account.refresh_from_db()
    assert (account.balance, account.held) == (D("9.25"), D(0))  # a write-off costs nothing
    assert ledger_audit().clean


# --- (c) the engine's hold result and the Hold model ---------------------------------------------


def _columns(relation: str) -> list[tuple[str, int]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attname, atttypid FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            [relation],
        )
        return [(name, type_id) for name, type_id in cursor.fetchall()]


@pytest.mark.django_db
def test_the_hold_result_type_carries_every_hold_column_in_the_services_order() -> None:
    result = _columns("billing_engine.hold_result")
    assert [name for name, _ in result[:3]] == ["result", "detail", "charged"]
    assert tuple(name for name, _ in result[3:]) == HOLD_RESULT_COLUMNS
    assert {field.attname for field in Hold._meta.concrete_fields} == set(HOLD_RESULT_COLUMNS)
    # ... each of the type the table's column has (billing_engine.hold_out copies them over).
    table = dict(_columns(Hold._meta.db_table))
    assert dict(result[3:]) == {name: table[name] for name in HOLD_RESULT_COLUMNS}


def _hold_fields(hold: Hold) -> dict[str, tuple[object, type]]:
    return {
        field.attname: (getattr(hold, field.attname), type(getattr(hold, field.attname)))
        for field in Hold._meta.concrete_fields
    }


@pytest.mark.django_db
def test_the_hold_a_service_returns_is_the_row_the_orm_reads(now: datetime) -> None:
    # Every column, value and type alike: money as Decimal, times as aware datetimes, and the
    # checkpoint's jsonb decoded as the ORM's JSONField gives it (not its text).
    account = make_account(now=now)
    key = make_key(account=account, now=now).api_key
    placed = hold_place(api_key=key, request_id="mapped", amount=D("2"), now=now)
    assert _hold_fields(placed) == _hold_fields(Hold.objects.get(request_id="mapped"))
    Hold.objects.filter(request_id="mapped").update(
        checkpoint_cost=D("0.5"), checkpoint_usage={"input_tokens": 7}, checkpoint_at=now
    )
    settled = hold_settle(request_id="mapped", cost=D("0.75"), now=now + timedelta(seconds=1))
    stored = Hold.objects.get(request_id="mapped")
    assert _hold_fields(settled.hold) == _hold_fields(stored)
    assert settled.hold.checkpoint_usage == {"input_tokens": 7}
    assert (settled.transaction_id, settled.is_overrun, settled.is_late) == (
        stored.transaction_id,
        False,
        False,
    )


# --- (d) what the database refuses, around the engine and the ORM --------------------------------


@pytest.fixture
def raw() -> Iterator[psycopg.Connection]:
    """A connection of its own, as a console session or another program would have. Closed,
    never committed, at the end: what a test left uncommitted is discarded."""
    conn = psycopg.connect(database_url_of_tests())
    try:
        yield conn
    finally:
        conn.close()


def _raw_transaction(raw: psycopg.Connection, key: str) -> int:
    row = raw.execute(
        """INSERT INTO billing_ledgertransaction
               (kind, idempotency_key, content_hash, request_id, memo, occurred_at, posted_at,
                model_alias, is_overrun, is_late)
           VALUES ('adjustment', %s, '', '', 'raw sql', now(), now(), '', false, false)
           RETURNING id""",
        [key],
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("legs", "refusal"),
    [
        pytest.param([], "has fewer than two legs", id="empty"),
        pytest.param([UNITS], "has fewer than two legs", id="single-leg"),
        pytest.param([UNITS, -UNITS + 1], "is unbalanced", id="unbalanced"),
        pytest.param([UNITS, -UNITS // 2, -UNITS // 2 - 1], "is unbalanced", id="three-legs"),
    ],
)
def test_a_raw_transaction_that_does_not_balance_is_refused_at_commit(
    raw: psycopg.Connection, now: datetime, legs: list[int], refusal: str
) -> None:
    customer = make_account(credits=D(10), now=now)
    key = f"raw-{uuid.uuid4()}"
    transaction_id = _raw_transaction(raw, key)
    for index, units in enumerate(legs):
        account_id = customer.pk if index == 0 else PROMOTIONS
        raw.execute(
            "INSERT INTO billing_ledgerleg (transaction_id, account_id, amount)"
            " VALUES (%s, %s, %s)",
            [transaction_id, account_id, units],
        )
    # Every statement ran: the triggers are deferred, only COMMIT refuses.
    with pytest.raises(psycopg.errors.IntegrityError, match=refusal):
        raw.commit()
    assert not LedgerTransaction.objects.filter(idempotency_key=key).exists()
    assert not LedgerLeg.objects.filter(transaction_id=transaction_id).exists()
    assert ledger_audit().clean


@pytest.mark.django_db(transaction=True)
def test_a_balanced_raw_transaction_commits(raw: psycopg.Connection, now: datetime) -> None:
    # The refusals above are the legs' fault, not the raw connection's.
    customer = make_account(credits=D(10), now=now)
    transaction_id = _raw_transaction(raw, f"raw-{uuid.uuid4()}")
    for account_id, units in [(customer.pk, UNITS), (PROMOTIONS, -UNITS)]:
        raw.execute(
            "INSERT INTO billing_ledgerleg (transaction_id, account_id, amount)"
            " VALUES (%s, %s, %s)",
            [transaction_id, account_id, units],
        )
    raw.commit()
    assert LedgerLeg.objects.filter(transaction_id=transaction_id).count() == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(
            "UPDATE billing_ledgerleg SET amount = amount * 2 WHERE transaction_id = %s",
            id="update-legs",
        ),
        pytest.param("DELETE FROM billing_ledgerleg WHERE transaction_id = %s", id="delete-legs"),
        pytest.param(
            "UPDATE billing_ledgertransaction SET is_overrun = true WHERE id = %s",
            id="update-transaction",
        ),
        pytest.param(
            "DELETE FROM billing_ledgertransaction WHERE id = %s", id="delete-transaction"
        ),
    ],
)
def test_an_engine_posting_cannot_be_edited_or_deleted(
    raw: psycopg.Connection, now: datetime, statement: str
) -> None:
    account = make_account(credits=D(10), now=now)
    key = make_key(account=account, now=now).api_key
    hold_place(api_key=key, request_id="r1", amount=D(2), now=now)
    settled = hold_settle(request_id="r1", cost=D("0.75"), now=now)

    with pytest.raises(psycopg.errors.IntegrityError, match="append-only"):
        raw.execute(statement, [settled.transaction_id])
    raw.rollback()
    assert sorted(
        LedgerLeg.objects.filter(transaction_id=settled.transaction_id).values_list(
            "amount", flat=True
        )
    ) == [D("-0.75"), D("0.75")]
    assert not LedgerTransaction.objects.get(pk=_posted(settled.transaction_id)).is_overrun
    assert ledger_audit().clean


# --- (e) the migrations install and remove it ----------------------------------------------------


def _engine_objects() -> dict[str, object]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT n.nspname, count(p.oid) FROM pg_namespace AS n"
            " LEFT JOIN pg_proc AS p ON p.pronamespace = n.oid"
            " WHERE n.nspname IN ('billing_engine', 'reconciliation_engine') GROUP BY n.nspname"
        )
        schemas = dict(cursor.fetchall())
        cursor.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'billing_ledgertransaction_has_legs'"
        )
        [[triggers]] = cursor.fetchall()
    return {"schemas": schemas, "has_legs_trigger": triggers}


def _applied(app: str) -> set[str]:
    executor = MigrationExecutor(connection)
    return {name for label, name in executor.loader.applied_migrations if label == app}


@pytest.mark.django_db(transaction=True)
def test_the_migrations_remove_the_engine_and_install_it_again(now: datetime) -> None:
    installed = _engine_objects()
    assert set(installed["schemas"]) == {"billing_engine", "reconciliation_engine"}  # type: ignore[call-overload]
    assert installed["has_legs_trigger"] == 1
    account = make_account(credits=D(10), now=now)
    key = make_key(account=account, now=now).api_key
    hold_place(api_key=key, request_id="before", amount=D(1), now=now)  # prepared here now
    try:
        call_command("migrate", "billing", "0005", verbosity=0)
        # The queue's functions call the engine's: their migration goes back first.
        assert "0005_queue_engine" not in _applied("reconciliation")
        assert not {"0006_money_engine", "0007_transaction_needs_legs"} & _applied("billing")
        assert _engine_objects() == {"schemas": {}, "has_legs_trigger": 0}
        with pytest.raises(ProgrammingError, match="billing_engine"):
            hold_place(api_key=key, request_id="between", amount=D(1), now=now)
    finally:
        call_command("migrate", verbosity=0)  # later tests need the whole schema
    assert _engine_objects() == installed
    assert {"0006_money_engine", "0007_transaction_needs_legs"} <= _applied("billing")

    # The same connection, whose prepared engine calls named the dropped functions, works again.
    hold = hold_place(api_key=key, request_id="after", amount=D(2), now=now)
    settled = hold_settle(request_id="after", cost=D(1), now=now + timedelta(seconds=1))
    assert hold.state == Hold.State.ACTIVE and settled.transaction_id is not None
    assert not Hold.objects.filter(request_id="between").exists()
    account.refresh_from_db()
    assert (account.balance, account.held) == (D(9), D(1))  # "before" is still held
    assert ledger_audit().clean


@pytest.mark.django_db
def test_a_hold_on_an_account_whose_overdraft_and_balance_pass_bigint_is_decided_not_an_error(
    now: datetime,
) -> None:
    # balance - held + overdraft once overflowed bigint: every hold was a DataError (a 503).
    from billing.money import MAX_AMOUNT
    from tests.factories import make_account as fresh_account

    rich = fresh_account(credits=D(10), overdraft=MAX_AMOUNT - D(5), now=now)
    key = make_key(account=rich, now=now).api_key
    hold = hold_place(api_key=key, request_id="big-1", amount=D(2), now=now)
    assert hold.amount == D(2)
    rich.refresh_from_db()
    assert rich.held == D(2)


def _posted(transaction_id: int | None) -> int:
    assert transaction_id is not None, "the settle posted nothing"
    return transaction_id
