"""The database itself enforces the ledger's invariants: these tests go around the ORM and the
services with raw SQL, as a buggy migration, a console session or another program would."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction

from billing.models import SYSTEM_ACCOUNT_IDS, Account, LedgerLeg, LedgerTransaction
from billing.selectors import ledger_audit
from tests.factories import make_account

pytestmark = pytest.mark.django_db(transaction=True)

PROMOTIONS = SYSTEM_ACCOUNT_IDS[Account.Kind.PROMOTIONS]
UNITS = 10**10  # money columns are bigint units of 1e-10 USD


def insert_transaction(cursor, key: str) -> int:  # type: ignore[no-untyped-def]
    cursor.execute(
        """INSERT INTO billing_ledgertransaction
               (kind, idempotency_key, content_hash, request_id, memo, occurred_at, posted_at,
                model_alias, is_overrun, is_late)
           VALUES ('adjustment', %s, '', '', 'raw sql', now(), now(), '', false, false)
           RETURNING id""",
        [key],
    )
    return cursor.fetchone()[0]


def insert_leg(cursor, transaction_id: int, account_id: int, units: int) -> None:  # type: ignore[no-untyped-def]
    cursor.execute(
        "INSERT INTO billing_ledgerleg (transaction_id, account_id, amount) VALUES (%s, %s, %s)",
        [transaction_id, account_id, units],
    )


@pytest.fixture
def customer(now) -> Account:  # type: ignore[no-untyped-def]
    return make_account(credits=Decimal("10"), now=now)


@pytest.mark.parametrize(
    ("legs", "refusal"),
    [
        # The transaction's own trigger (0007) fires first: its row was written first.
        pytest.param([], "has fewer than two legs", id="no-legs"),
        pytest.param([UNITS], "has fewer than two legs", id="single-leg"),
        pytest.param([UNITS, -(UNITS - 1)], "is unbalanced", id="off-by-one-unit"),
    ],
)
def test_unbalanced_transaction_fails_at_commit(
    customer: Account, legs: list[int], refusal: str
) -> None:
    key = f"raw-{uuid.uuid4()}"
    statements_ran = []

    def write() -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            txn_id = insert_transaction(cursor, key)
            if legs:
                insert_leg(cursor, txn_id, customer.pk, legs[0])
            for units in legs[1:]:
                insert_leg(cursor, txn_id, PROMOTIONS, units)
            statements_ran.append(True)  # deferred: only COMMIT may refuse

    with pytest.raises(IntegrityError, match=refusal):
        write()
    assert statements_ran == [True]
    assert not LedgerTransaction.objects.filter(idempotency_key=key).exists()


def test_balanced_transaction_commits(customer: Account) -> None:
    key = f"raw-{uuid.uuid4()}"
    with transaction.atomic(), connection.cursor() as cursor:
        txn_id = insert_transaction(cursor, key)
        insert_leg(cursor, txn_id, customer.pk, 3 * UNITS)
        insert_leg(cursor, txn_id, PROMOTIONS, -2 * UNITS)
        insert_leg(cursor, txn_id, PROMOTIONS, -1 * UNITS)
    amounts = sorted(
        LedgerLeg.objects.filter(transaction_id=txn_id).values_list("amount", flat=True)
    )
    assert amounts == [Decimal(-2), Decimal(-1), Decimal(3)]


def test_audit_reports_a_balance_the_ledger_does_not_justify(customer: Account) -> None:
    # A balanced raw insert bypasses the cached balance: the audit must notice.
    with transaction.atomic(), connection.cursor() as cursor:
        txn_id = insert_transaction(cursor, f"raw-{uuid.uuid4()}")
        insert_leg(cursor, txn_id, customer.pk, UNITS)
        insert_leg(cursor, txn_id, PROMOTIONS, -UNITS)
    report = ledger_audit()
    assert [row["account_id"] for row in report.mismatches] == [customer.pk]
    assert report.mismatches[0]["ledger_balance"] == "11.0000000000"
    assert report.mismatches[0]["cached_balance"] == "10.0000000000"


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(
            "UPDATE billing_ledgerleg SET amount = amount + 1 WHERE transaction_id = %s",
            id="update-leg-amount",
        ),
        pytest.param(
            "UPDATE billing_ledgerleg SET account_id = account_id WHERE transaction_id = %s",
            id="update-leg-noop",
        ),
        pytest.param("DELETE FROM billing_ledgerleg WHERE transaction_id = %s", id="delete-leg"),
        pytest.param(
            "UPDATE billing_ledgertransaction SET memo = 'edited' WHERE id = %s",
            id="update-transaction",
        ),
        pytest.param(
            "DELETE FROM billing_ledgertransaction WHERE id = %s", id="delete-transaction"
        ),
    ],
)
def test_posted_ledger_rows_cannot_change(customer: Account, statement: str) -> None:
    txn = LedgerTransaction.objects.get(legs__account=customer)
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(statement, [txn.pk])
    txn.refresh_from_db()
    assert txn.memo == "opening credits"
    assert sorted(txn.legs.values_list("amount", flat=True)) == [Decimal(-10), Decimal(10)]


def test_zero_leg_is_refused(customer: Account) -> None:
    def write() -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            txn_id = insert_transaction(cursor, f"raw-{uuid.uuid4()}")
            insert_leg(cursor, txn_id, customer.pk, 0)

    with pytest.raises(IntegrityError, match="leg_amount_non_zero"):
        write()


def test_negative_held_is_refused(customer: Account) -> None:
    with pytest.raises(IntegrityError, match="account_held_non_negative"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("UPDATE billing_account SET held = -1 WHERE id = %s", [customer.pk])
    customer.refresh_from_db()
    assert customer.held == 0


@pytest.mark.parametrize("units", [pytest.param(0, id="zero"), pytest.param(-1, id="negative")])
def test_hold_amount_must_be_positive(customer: Account, units: int) -> None:
    with pytest.raises(IntegrityError, match="hold_amount_positive"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                """INSERT INTO billing_hold
                       (request_id, account_id, model_alias, amount, budgeted, state, created_at,
                        expires_at, is_overrun, is_late)
                   VALUES (%s, %s, '', %s, false, 'active', now(), now(), false, false)""",
                [f"raw-{uuid.uuid4()}", customer.pk, units],
            )
