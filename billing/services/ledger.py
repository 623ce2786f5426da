"""Postings from their legs: grants, purchases, refunds, adjustments and reversals.

The engine's `ledger_post` (billing/sql/engine_0002.sql) is the one writer of ledger rows and
cached balances: it checks the legs balance, writes the transaction and its legs and moves the
customer balances, idempotently by the posting's key. Settles and finance's request postings
make their legs inside the engine itself (billing/services/holds.py calls them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from billing.engine import Rows, engine_call, sql_rows
from billing.errors import (
    AccountNotFound,
    IdempotencyConflict,
    RefundExceedsPaid,
    TransactionAlreadyReversed,
    UnbalancedTransaction,
)
from billing.models import SYSTEM_ACCOUNT_IDS, Account
from billing.money import from_units, to_units


@dataclass(frozen=True)
class Leg:
    account_id: int
    amount: Decimal  # positive credits the account's balance, negative debits it


@dataclass(frozen=True)
class Posting:
    """What a transaction does to balances, plus what identifies it."""

    kind: str
    legs: Sequence[Leg]
    idempotency_key: str
    occurred_at: datetime
    request_id: str = ""
    memo: str = ""


@dataclass(frozen=True)
class Posted:
    transaction_id: int
    replayed: bool  # the key had been posted before, with the same content: nothing new


def system_account_id(kind: str) -> int:
    return SYSTEM_ACCOUNT_IDS[kind]


_LEDGER_POST_SQL = engine_call(
    "ledger_post",
    ["kind", "idempotency_key", "account_ids", "amounts", "occurred_at", "now", "request_id",
     "memo", "posted_by", "reverses_id"],
)
_TRANSACTION_REVERSE_SQL = engine_call(
    "transaction_reverse", ["transaction_id", "idempotency_key", "memo", "posted_by", "now"]
)


def _posted(rows: Rows, *, idempotency_key: str) -> Posted:
    [(result, transaction_id)] = rows
    match result:
        case "posted" | "replayed":
            return Posted(transaction_id=transaction_id, replayed=result == "replayed")
        case "conflict":
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r} was used for a different posting"
            )
        case "unbalanced":
            raise UnbalancedTransaction("a posting needs two or more non-zero legs summing to zero")
        case "account_missing":
            raise AccountNotFound("a leg names no such account")
        case "already_reversed":
            raise TransactionAlreadyReversed("the transaction has been reversed already")
        case "not_found":
            raise AccountNotFound("no such transaction")
        case "refund_exceeds_paid":  # the engine returns the refundable units in the id column
            raise RefundExceedsPaid(refundable=from_units(transaction_id))
    raise AssertionError(f"unknown engine result {result!r}")


def ledger_post(*, posting: Posting, now: datetime, posted_by_id: int | None = None) -> Posted:
    """Post once by the posting's key, in the caller's transaction or as its own."""
    params = {
        "kind": posting.kind,
        "idempotency_key": posting.idempotency_key,
        "account_ids": [leg.account_id for leg in posting.legs],
        "amounts": [to_units(leg.amount) for leg in posting.legs],
        "occurred_at": posting.occurred_at,
        "now": now,
        "request_id": posting.request_id,
        "memo": posting.memo,
        "posted_by": posted_by_id,
        "reverses_id": None,
    }
    return _posted(sql_rows(_LEDGER_POST_SQL, params), idempotency_key=posting.idempotency_key)


def transaction_reverse(
    *,
    transaction_id: int,
    memo: str,
    idempotency_key: str,
    now: datetime,
    posted_by_id: int | None = None,
) -> Posted:
    """Post the mirror image of a transaction, once. Entries are never edited; this is the fix."""
    params = {
        "transaction_id": transaction_id,
        "idempotency_key": idempotency_key,
        "memo": memo,
        "posted_by": posted_by_id,
        "now": now,
    }
    return _posted(sql_rows(_TRANSACTION_REVERSE_SQL, params), idempotency_key=idempotency_key)


def account_ensure_system(*, account_model: type[Account] | None = None) -> None:
    """Create the system accounts if missing (runs after every migrate and test flush)."""
    model = account_model or Account
    names: dict[str, str] = {
        Account.Kind.REVENUE: "Revenue (usage)",
        Account.Kind.PROMOTIONS: "Promotions (grants)",
        Account.Kind.WRITE_OFFS: "Write-offs",
        Account.Kind.PAYMENTS: "Payments",
    }
    for kind, account_id in SYSTEM_ACCOUNT_IDS.items():
        model.objects.get_or_create(pk=account_id, defaults={"kind": kind, "name": names[kind]})
