"""Customer accounts and the credit movements finance posts on them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import transaction

from billing.engine import engine_call, sql_rows
from billing.errors import AccountNotFound, InvalidAmount
from billing.models import Account, LedgerTransaction
from billing.money import ZERO, from_units
from billing.services.ledger import Leg, Posted, Posting, ledger_post, system_account_id

# Where each kind of customer credit comes from. Purchases are paid money, grants are
# promotional, refunds return usage revenue; adjustments are signed corrections of usage.
CREDIT_SOURCES: dict[str, str] = {
    LedgerTransaction.Kind.PURCHASE: Account.Kind.PAYMENTS,
    LedgerTransaction.Kind.GRANT: Account.Kind.PROMOTIONS,
    LedgerTransaction.Kind.REFUND: Account.Kind.REVENUE,
    LedgerTransaction.Kind.ADJUSTMENT: Account.Kind.REVENUE,
}

_ACCOUNT_REFUNDABLE_SQL = engine_call("account_refundable", ["account_id"])


def account_refundable(*, account_id: int) -> Decimal:
    """What a refund may still return to the account: its usage charged plus its purchases,
    less earlier refunds (the engine's rule, which `ledger_post` applies under the account's
    lock; this read is for showing it, e.g. on the admin's refund confirmation)."""
    [(units,)] = sql_rows(_ACCOUNT_REFUNDABLE_SQL, {"account_id": account_id})
    return from_units(units)


def account_create(
    *,
    name: str,
    now: datetime,
    credits: Decimal = ZERO,
    overdraft: Decimal = ZERO,
    posted_by_id: int | None = None,
) -> Account:
    if not name.strip():
        raise InvalidAmount("an account needs a name")
    if credits < 0 or overdraft < 0:
        raise InvalidAmount("credits and overdraft cannot be negative")
    with transaction.atomic(durable=True):
        account = Account.objects.create(name=name.strip(), overdraft=overdraft)
        if credits > 0:
            ledger_post(
                posting=credit_posting(
                    kind=LedgerTransaction.Kind.GRANT,
                    account_id=account.pk,
                    amount=credits,
                    idempotency_key=f"account:{account.pk}:opening-credits",
                    memo="opening credits",
                    now=now,
                ),
                now=now,
                posted_by_id=posted_by_id,
            )
    account.refresh_from_db()
    return account


def credit_posting(
    *,
    kind: str,
    account_id: int,
    amount: Decimal,
    idempotency_key: str,
    memo: str,
    now: datetime,
    request_id: str = "",
) -> Posting:
    """Credit (amount > 0) or debit (amount < 0, adjustments only) a customer account."""
    if kind not in CREDIT_SOURCES:
        raise InvalidAmount(f"{kind!r} is not a credit kind")
    if amount == 0 or (amount < 0 and kind != LedgerTransaction.Kind.ADJUSTMENT):
        raise InvalidAmount(f"a {kind} needs a positive amount")
    source = system_account_id(CREDIT_SOURCES[kind])
    return Posting(
        kind=kind,
        legs=[Leg(account_id=account_id, amount=amount), Leg(account_id=source, amount=-amount)],
        idempotency_key=idempotency_key,
        occurred_at=now,
        request_id=request_id,
        memo=memo,
    )


def credit_post(
    *,
    kind: str,
    account_id: int,
    amount: Decimal,
    memo: str,
    idempotency_key: str,
    now: datetime,
    posted_by_id: int | None = None,
    request_id: str = "",
) -> Posted:
    """Post a purchase, grant, refund or adjustment once, in one engine call. A refund beyond
    `account_refundable` is refused (RefundExceedsPaid) and writes nothing."""
    if not memo.strip():
        raise InvalidAmount("a memo is required")
    if account_id <= 0:  # a system account: the engine checks each leg's kind, not its role
        raise AccountNotFound(f"no customer account {account_id}")
    posting = credit_posting(
        kind=kind,
        account_id=account_id,
        amount=amount,
        idempotency_key=idempotency_key,
        memo=memo.strip(),
        now=now,
        request_id=request_id,
    )
    try:
        return ledger_post(posting=posting, now=now, posted_by_id=posted_by_id)
    except AccountNotFound:
        raise AccountNotFound(f"no customer account {account_id}") from None


@transaction.atomic(durable=True)
def account_status_set(*, account_id: int, status: str) -> None:
    if not Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER).update(status=status):
        raise AccountNotFound(f"no customer account {account_id}")
