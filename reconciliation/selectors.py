"""Reads for the finance admin: the reconciliation dashboard's figures."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from billing.models import SYSTEM_ACCOUNT_IDS, Account, LedgerLeg, LedgerTransaction
from billing.money import ZERO, money_str
from reconciliation.models import ReconciliationItem


@dataclass(frozen=True)
class QueueFigure:
    count: int
    cost: Decimal  # known cost of the requests (what charging them all would collect)
    held: Decimal  # what their holds reserved


@dataclass(frozen=True)
class Dashboard:
    deduction_failures: QueueFigure
    expired_holds: QueueFigure
    audit_mismatches: int
    revenue_by_day: list[tuple[date, Decimal]]  # oldest first, every day present

    @property
    def revenue_total(self) -> Decimal:
        return sum((amount for _, amount in self.revenue_by_day), ZERO)


def _pending(kind: str) -> QueueFigure:
    row = ReconciliationItem.objects.filter(
        kind=kind, status=ReconciliationItem.Status.PENDING
    ).aggregate(count=Count("id"), cost=Sum("cost"), held=Sum("held_amount"))
    return QueueFigure(count=row["count"], cost=row["cost"] or ZERO, held=row["held"] or ZERO)


def usage_revenue_by_day(*, now: datetime, days: int = 30) -> list[tuple[date, Decimal]]:
    """Usage revenue (the revenue account's legs of usage postings) per UTC day, the last
    `days` days up to and including today, zero-filled."""
    first = now.date() - timedelta(days=days - 1)
    rows = (
        LedgerLeg.objects.filter(
            account_id=SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE],
            transaction__kind=LedgerTransaction.Kind.USAGE,
            transaction__posted_at__date__gte=first,
            transaction__posted_at__date__lte=now.date(),
        )
        .annotate(day=TruncDate("transaction__posted_at"))
        .values("day")
        .annotate(total=Sum("amount"))
        .order_by("day")
    )
    totals = {row["day"]: row["total"] for row in rows}
    return [
        (first + timedelta(days=n), totals.get(first + timedelta(days=n), ZERO))
        for n in range(days)
    ]


def dashboard_get(*, now: datetime) -> Dashboard:
    return Dashboard(
        deduction_failures=_pending(ReconciliationItem.Kind.DEDUCTION_FAILURE),
        expired_holds=_pending(ReconciliationItem.Kind.EXPIRED_HOLD),
        audit_mismatches=ReconciliationItem.objects.filter(
            kind=ReconciliationItem.Kind.AUDIT_MISMATCH, status=ReconciliationItem.Status.PENDING
        ).count(),
        revenue_by_day=usage_revenue_by_day(now=now),
    )


@dataclass(frozen=True)
class ItemPreview:
    """What one item action would do, shown on its confirmation page before anything moves."""

    item: ReconciliationItem
    effect: str
    problem: str = ""


def item_action_preview(*, items: list[ReconciliationItem], action: str) -> list[ItemPreview]:
    """Each item's effect under `action`; balances accumulate across items of one account."""
    # Imported here: finance services import this app's models, selectors stay import-light.
    from billing.selectors import request_posting_get
    from reconciliation.services.finance import (
        ItemNotActionable,
        item_charge_amount,
        item_write_off_amount,
    )

    balances: dict[int, Decimal] = {}
    previews = []
    for item in items:
        if item.status != ReconciliationItem.Status.PENDING:
            previews.append(ItemPreview(item=item, effect="", problem=f"already {item.status}"))
            continue
        posted = request_posting_get(request_id=item.request_id) if item.request_id else None
        try:
            if action == "charge":
                amount = item_charge_amount(item)
                if posted is not None:
                    effect = (
                        f"already posted as {posted.kind} #{posted.pk}: nothing will be charged"
                    )
                else:
                    account_id = item.account_id
                    if account_id is None:
                        raise ItemNotActionable("the item has no account")
                    if account_id not in balances:
                        balances[account_id] = Account.objects.get(pk=account_id).balance
                    before = balances[account_id]
                    balances[account_id] = before - amount
                    effect = (
                        f"charge {money_str(amount)} USD to account #{account_id}: balance "
                        f"{money_str(before)} -> {money_str(before - amount)}"
                    )
            elif action == "write_off":
                amount = item_write_off_amount(item)
                if posted is not None:
                    raise ItemNotActionable(f"already posted as {posted.kind} #{posted.pk}")
                effect = (
                    f"write off {money_str(amount)} USD: revenue +{money_str(amount)}, "
                    f"write-offs -{money_str(amount)}; the customer is not charged"
                )
            elif action == "retry":
                if item.kind != ReconciliationItem.Kind.DEDUCTION_FAILURE:
                    raise ItemNotActionable("only a deduction failure can be retried")
                amount = item_charge_amount(item)
                effect = (
                    f"queue the settle of {money_str(amount)} USD again under the request's key"
                    + (" (already posted: it will charge nothing)" if posted else "")
                )
            else:
                effect = "close the item with the note; no money moves"
        except ItemNotActionable as exc:
            previews.append(ItemPreview(item=item, effect="", problem=str(exc)))
            continue
        previews.append(ItemPreview(item=item, effect=effect))
    return previews
