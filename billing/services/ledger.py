"""The only writer of ledger rows and cached balances.

`ledger_post` runs inside its caller's transaction; outer services wrap it with
`ledger_post_once`, which makes the posting idempotent by its key.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.models import F

from billing.errors import IdempotencyConflict, UnbalancedTransaction
from billing.models import SYSTEM_ACCOUNT_IDS, Account, LedgerLeg, LedgerTransaction
from billing.money import ZERO, money_str, money_value


@dataclass(frozen=True)
class Leg:
    account_id: int
    amount: Decimal


@dataclass(frozen=True)
class Posting:
    """What a transaction does to balances, plus what identifies it."""

    kind: str
    legs: Sequence[Leg]
    idempotency_key: str
    occurred_at: datetime
    request_id: str = ""
    memo: str = ""
    model_alias: str = ""
    reverses_id: int | None = None
    is_overrun: bool = False
    is_late: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """Identity of the money effect. A replay under the same key must match it; memo and
        author may differ (a double submit of a form is the same posting)."""
        content = {
            "kind": self.kind,
            "legs": sorted((leg.account_id, money_str(leg.amount)) for leg in self.legs),
            "request_id": self.request_id,
            "reverses": self.reverses_id,
        }
        encoded = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()


def system_account_id(kind: str) -> int:
    return SYSTEM_ACCOUNT_IDS[kind]


def request_idempotency_key(request_id: str) -> str:
    """The one key for every posting that charges (or writes off) a request."""
    return f"request:{request_id}"


def posting_validate(posting: Posting) -> None:
    if len(posting.legs) < 2:
        raise UnbalancedTransaction("a transaction needs at least two legs")
    if any(leg.amount == 0 for leg in posting.legs):
        raise UnbalancedTransaction("a leg cannot be zero")
    total = sum((leg.amount for leg in posting.legs), ZERO)
    if total != 0:
        raise UnbalancedTransaction(f"legs sum to {total}, not zero")


def ledger_post(
    *,
    posting: Posting,
    now: datetime,
    posted_by: AbstractBaseUser | None = None,
    held_release: Mapping[int, Decimal] | None = None,
    on_posted: Callable[[LedgerTransaction], None] | None = None,
) -> LedgerTransaction:
    """Write one balanced transaction and move the cached balances it justifies.

    Must run inside the caller's transaction. `held_release` lowers `held` on the same account
    rows in the same statement (a settle releases its hold while it posts). `on_posted(txn)`
    runs after the transaction and its legs are written and before any balance row is locked.
    Raises IntegrityError if the idempotency key exists: callers go through `ledger_post_once`.
    """
    assert connection.in_atomic_block, "ledger_post must run inside a transaction"
    posting_validate(posting)
    # Inserting the transaction first takes the idempotency key's unique-index lock before any
    # balance row, so concurrent replays queue on the key and never on an account.
    txn = LedgerTransaction.objects.create(
        kind=posting.kind,
        idempotency_key=posting.idempotency_key,
        content_hash=posting.content_hash,
        request_id=posting.request_id,
        memo=posting.memo,
        posted_by_id=posted_by.pk if posted_by is not None else None,
        occurred_at=posting.occurred_at,
        posted_at=now,
        reverses_id=posting.reverses_id,
        model_alias=posting.model_alias,
        is_overrun=posting.is_overrun,
        is_late=posting.is_late,
    )
    LedgerLeg.objects.bulk_create(
        [
            LedgerLeg(transaction=txn, account_id=leg.account_id, amount=leg.amount)
            for leg in posting.legs
        ]
    )
    if on_posted is not None:
        on_posted(txn)
    # Balance rows last: they are the contended locks, held from here to COMMIT.
    deltas: dict[int, Decimal] = defaultdict(lambda: ZERO)
    for leg in posting.legs:
        deltas[leg.account_id] += leg.amount
    release = held_release or {}
    # Fixed lock order (ascending id) so two postings can never deadlock on account rows.
    for account_id in sorted(set(deltas) | set(release)):
        if account_id < 0:
            continue  # system accounts carry no cached balance: they would be a hot row
        changes = {}
        if deltas.get(account_id):
            changes["balance"] = F("balance") + money_value(deltas[account_id])
        if release.get(account_id):
            changes["held"] = F("held") - money_value(release[account_id])
        if changes:
            Account.objects.filter(pk=account_id).update(**changes)
    return txn


def ledger_replay(*, posting: Posting) -> LedgerTransaction | None:
    """The transaction already posted under this key, if its content matches; else raises."""
    existing = LedgerTransaction.objects.filter(idempotency_key=posting.idempotency_key).first()
    if existing is None:
        return None
    if existing.content_hash != posting.content_hash:
        raise IdempotencyConflict(
            f"idempotency key {posting.idempotency_key!r} was used for a different posting"
        )
    return existing


T = TypeVar("T")


def once_by_key(
    *, posting: Posting, write: Callable[[], T], replay: Callable[[LedgerTransaction], T]
) -> T:
    """Run `write` in a durable transaction; if the key was taken, return `replay(original)`."""
    try:
        with transaction.atomic(durable=True):
            return write()
    except IntegrityError:
        existing = ledger_replay(posting=posting)
        if existing is None:
            raise
        return replay(existing)


def ledger_post_once(
    *, posting: Posting, now: datetime, posted_by: AbstractBaseUser | None = None
) -> tuple[LedgerTransaction, bool]:
    """Post in its own transaction. Returns (transaction, replayed)."""
    return once_by_key(
        posting=posting,
        write=lambda: (ledger_post(posting=posting, now=now, posted_by=posted_by), False),
        replay=lambda existing: (existing, True),
    )


def transaction_reverse(
    *,
    transaction_id: int,
    memo: str,
    idempotency_key: str,
    now: datetime,
    posted_by: AbstractBaseUser | None = None,
) -> tuple[LedgerTransaction, bool]:
    """Post the mirror image of a transaction. Entries are never edited; this is the fix."""
    original = LedgerTransaction.objects.get(pk=transaction_id)
    legs = [Leg(account_id=leg.account_id, amount=-leg.amount) for leg in original.legs.all()]
    posting = Posting(
        kind=LedgerTransaction.Kind.REVERSAL,
        legs=legs,
        idempotency_key=idempotency_key,
        occurred_at=now,
        request_id=original.request_id,
        memo=memo,
        reverses_id=original.pk,
    )
    return ledger_post_once(posting=posting, now=now, posted_by=posted_by)


def account_ensure_system() -> None:
    """Create the system accounts if missing (runs after every migrate and test flush)."""
    names: dict[str, str] = {
        Account.Kind.REVENUE: "Revenue (usage)",
        Account.Kind.PROMOTIONS: "Promotions (grants)",
        Account.Kind.WRITE_OFFS: "Write-offs",
        Account.Kind.PAYMENTS: "Payments",
    }
    for kind, account_id in SYSTEM_ACCOUNT_IDS.items():
        Account.objects.get_or_create(pk=account_id, defaults={"kind": kind, "name": names[kind]})
