"""Issuing monthly statements: once a month has ended, each customer account's statement is
stored with its figures and its PDF, and never changed (a correction is a posting, and shows
in the next month's statement)."""

from __future__ import annotations

from datetime import date, datetime

from django.db import IntegrityError, transaction
from django.db.models import Q

from billing.errors import InvalidAmount
from billing.models import Account, Statement
from billing.statements import (
    month_next,
    month_previous,
    month_start,
    statement_figures_get,
    statement_pdf,
)


def statement_issue(*, account_id: int, month: date, now: datetime) -> tuple[Statement, bool]:
    """The account's issued statement for `month`, issuing it if it was not (True if this call
    did). Idempotent: a second call, or a task that runs twice, returns the first."""
    if month_start(month_next(month)) > now:
        raise InvalidAmount(f"{month:%Y-%m} has not ended: only its provisional statement exists")
    issued = Statement.objects.filter(account_id=account_id, month=month).first()
    if issued is not None:
        return issued, False
    figures = statement_figures_get(account_id=account_id, month=month, now=now)
    figures.data["issued_at"] = now.isoformat()
    pdf = statement_pdf(figures)  # rendered before the transaction: no lock waits on it
    try:
        with transaction.atomic(durable=True):
            return (
                Statement.objects.create(
                    account_id=account_id,
                    month=month,
                    issued_at=now,
                    figures=figures.data,
                    pdf=pdf,
                ),
                True,
            )
    except IntegrityError:  # issued concurrently (the unique constraint): that one stands
        return Statement.objects.get(account_id=account_id, month=month), False


def statement_accounts(*, month: date, unissued_only: bool = False) -> list[int]:
    """The customer accounts that get `month`'s statement: those that existed by its end or
    had postings by then (optionally only those not issued yet), by id."""
    end = month_start(month_next(month))
    accounts = (
        Account.objects.filter(kind=Account.Kind.CUSTOMER)
        .filter(Q(created_at__lt=end) | Q(legs__transaction__posted_at__lt=end))
        .distinct()
        .order_by("pk")
    )
    if unissued_only:
        accounts = accounts.exclude(statements__month=month)
    return list(accounts.values_list("pk", flat=True))


def statements_issue_for_month(*, month: date, now: datetime) -> dict[str, object]:
    """Issue `month`'s statement of every account that gets one, here and now (the operator's
    and the tests' door; the beat job fans out one task per account instead). Idempotent: an
    account already issued is counted, not issued again."""
    issued = existing = 0
    for account_id in statement_accounts(month=month):
        _, created = statement_issue(account_id=account_id, month=month, now=now)
        issued += created
        existing += not created
    return {"month": f"{month:%Y-%m}", "issued": issued, "already_issued": existing}


def statement_month_last(*, now: datetime) -> date:
    """The month the beat job issues on the 1st: the one before `now`'s."""
    return month_previous(date(now.year, now.month, 1))
