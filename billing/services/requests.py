"""A request's one posting, made by finance: charge its usage, or write it off.

Both are inner services: they run inside the caller's (durable) transaction, so the caller can
record who did it atomically with the effect. Both use the request's idempotency key, the same
one `hold_settle` uses, so a request is charged by a settle, charged by finance or written off,
and never two of these.

Lock order, as everywhere: hold row, then account rows (inside `ledger_post`), then the key row.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import F

from billing.errors import HoldAlreadyResolved, HoldNotFound, InvalidAmount
from billing.models import Account, Hold, LedgerTransaction
from billing.money import ZERO, money_value
from billing.services.holds import hold_budget_release, hold_charge
from billing.services.ledger import (
    Leg,
    Posting,
    ledger_post,
    request_idempotency_key,
    system_account_id,
)


def _hold_lock_optional(request_id: str) -> Hold | None:
    return Hold.objects.select_for_update().filter(request_id=request_id).first()


def _request_posting(*, request_id: str, hold: Hold | None) -> LedgerTransaction | None:
    """The request's posting if it has one (linked from its hold, or under its key)."""
    if hold is not None and hold.transaction_id is not None:
        return LedgerTransaction.objects.get(pk=hold.transaction_id)
    return LedgerTransaction.objects.filter(
        idempotency_key=request_idempotency_key(request_id)
    ).first()


def request_charge_post(
    *,
    request_id: str,
    cost: Decimal,
    memo: str,
    now: datetime,
    posted_by: AbstractBaseUser | None = None,
) -> LedgerTransaction | None:
    """Charge the request's usage exactly as its settle would have.

    If the request already has its posting (a late automatic settle got there first, or it was
    written off), nothing is posted and that posting is returned. A hold settled at zero cost
    has no posting: None is returned and nothing is charged.
    """
    assert connection.in_atomic_block, "request_charge_post must run inside a transaction"
    if cost <= 0:
        raise InvalidAmount("a charge must be positive")
    hold = _hold_lock_optional(request_id)
    if hold is None:
        raise HoldNotFound(f"no hold for request {request_id}")
    existing = _request_posting(request_id=request_id, hold=hold)
    if existing is not None or hold.state == Hold.State.SETTLED:
        return existing
    if hold.state == Hold.State.RELEASED:
        # Released means the upstream produced nothing: there is no usage to charge.
        raise HoldAlreadyResolved(request_id=request_id, state=hold.state)

    return hold_charge(hold=hold, cost=cost, now=now, memo=memo, posted_by=posted_by)


def write_off_posting(
    *, request_id: str, amount: Decimal, memo: str, now: datetime, model_alias: str = ""
) -> Posting:
    """Revenue is recognised for the usage and written off at once: the customer pays nothing
    and the loss is visible on the write-offs account."""
    return Posting(
        kind=LedgerTransaction.Kind.WRITE_OFF,
        legs=[
            Leg(account_id=system_account_id(Account.Kind.REVENUE), amount=amount),
            Leg(account_id=system_account_id(Account.Kind.WRITE_OFFS), amount=-amount),
        ],
        idempotency_key=request_idempotency_key(request_id),
        occurred_at=now,
        request_id=request_id,
        memo=memo,
        model_alias=model_alias,
    )


def request_write_off_post(
    *,
    request_id: str,
    amount: Decimal,
    memo: str,
    now: datetime,
    posted_by: AbstractBaseUser | None = None,
) -> LedgerTransaction:
    """Write off the request's usage under its idempotency key, releasing its hold if active.

    Refuses (HoldAlreadyResolved) if the request already has its posting: a request is either
    charged or written off, never both.
    """
    assert connection.in_atomic_block, "request_write_off_post must run inside a transaction"
    if amount <= 0:
        raise InvalidAmount("a write-off must be positive")
    hold = _hold_lock_optional(request_id)
    existing = _request_posting(request_id=request_id, hold=hold)
    if existing is not None:
        raise HoldAlreadyResolved(request_id=request_id, state=f"posted as {existing.kind}")
    if hold is not None and hold.state == Hold.State.SETTLED:
        raise HoldAlreadyResolved(request_id=request_id, state=hold.state)

    posting = write_off_posting(
        request_id=request_id,
        amount=amount,
        memo=memo,
        now=now,
        model_alias=hold.model_alias if hold is not None else "",
    )
    txn = ledger_post(posting=posting, now=now, posted_by=posted_by)
    if hold is not None:
        if hold.state == Hold.State.ACTIVE:
            # Nothing is charged, so the whole hold goes back, like a release.
            Account.objects.filter(pk=hold.account_id).update(
                held=F("held") - money_value(hold.amount)
            )
            hold_budget_release(hold=hold, release=hold.amount, spent=ZERO, now=now)
            hold.state = Hold.State.RELEASED
            hold.resolved_at = now
        hold.transaction = txn
        hold.save(update_fields=["state", "resolved_at", "transaction"])
    return txn
