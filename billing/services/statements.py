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


def statements_issue_for_month(*, month: date, now: datetime) -> dict[str, object]:
    """Issue `month`'s statement of every customer account that existed by its end or had
    postings by then. Idempotent: an account already issued is counted, not issued again."""
    end = month_start(month_next(month))
    accounts = (
        Account.objects.filter(kind=Account.Kind.CUSTOMER)
        .filter(Q(created_at__lt=end) | Q(legs__transaction__posted_at__lt=end))
        .distinct()
        .order_by("pk")
    )
    issued = existing = 0
    for account_id in accounts.values_list("pk", flat=True):
        _, created = statement_issue(account_id=account_id, month=month, now=now)
        issued += created
        existing += not created
    return {"month": f"{month:%Y-%m}", "issued": issued, "already_issued": existing}


def statements_issue_last_month(*, now: datetime) -> dict[str, object]:
    """What the beat job runs on the 1st: last month's statements."""
    return statements_issue_for_month(month=month_previous(date(now.year, now.month, 1)), now=now)
