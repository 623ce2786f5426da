"""Reads for the finance admin: the reconciliation dashboard's figures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate

from billing.models import SYSTEM_ACCOUNT_IDS, Account, LedgerLeg, LedgerTransaction, UsageRecord
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
    margins: Margins | None = None  # the same 30 days, from the usage records

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
        margins=margins_get(
            start=datetime.combine(now.date() - timedelta(days=29), time(), tzinfo=UTC),
            end=datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC),
        ),
    )


@dataclass(frozen=True)
class Margin:
    """Revenue (what customers were charged for usage), what it cost us upstream, and the
    gross margin. Usage whose model had no provider price is counted in `revenue` and in
    `unpriced_revenue`, and left out of the margin: its cost is unknown, not zero. So
    gross_margin = revenue - unpriced_revenue - provider_cost."""

    revenue: Decimal
    provider_cost: Decimal
    unpriced_revenue: Decimal

    @property
    def gross_margin(self) -> Decimal:
        return self.revenue - self.unpriced_revenue - self.provider_cost

    def as_json(self) -> dict[str, str]:
        return {
            "revenue": money_str(self.revenue),
            "provider_cost": money_str(self.provider_cost),
            "gross_margin": money_str(self.gross_margin),
            "unpriced_revenue": money_str(self.unpriced_revenue),
        }


@dataclass(frozen=True)
class Margins:
    total: Margin
    by_model: list[tuple[str, Margin]]  # by alias
    by_day: list[tuple[date, Margin]]  # oldest first, every day of the range present

    def as_json(self) -> dict[str, object]:
        return {
            **self.total.as_json(),
            "by_model": [{"model": model, **margin.as_json()} for model, margin in self.by_model],
            "by_day": [{"day": day.isoformat(), **margin.as_json()} for day, margin in self.by_day],
        }


# Named apart from the fields: an annotation called provider_cost would shadow the column in
# the unpriced filter.
_MARGIN_SUMS = {
    "revenue_sum": Sum("cost"),
    "provider_cost_sum": Sum("provider_cost"),
    "unpriced_sum": Sum("cost", filter=Q(provider_cost__isnull=True)),
}


def _margin(row: Mapping[str, Any]) -> Margin:
    return Margin(
        revenue=row["revenue_sum"] or ZERO,
        provider_cost=row["provider_cost_sum"] or ZERO,
        unpriced_revenue=row["unpriced_sum"] or ZERO,
    )


def margins_get(*, start: datetime, end: datetime) -> Margins:
    """Margins of the usage settled in [start, end) (by the usage record's settle time, UTC),
    in all, by model and by UTC day (zero-filled)."""
    records: QuerySet[UsageRecord] = UsageRecord.objects.filter(
        status=UsageRecord.Status.SETTLED, created_at__gte=start, created_at__lt=end
    )
    days = {
        row["day"]: _margin(row)
        for row in records.annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(**_MARGIN_SUMS)
    }
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    empty = Margin(revenue=ZERO, provider_cost=ZERO, unpriced_revenue=ZERO)
    return Margins(
        total=_margin(records.aggregate(**_MARGIN_SUMS)),
        by_model=[
            (row["model_alias"], _margin(row))
            for row in records.values("model_alias")
            .annotate(**_MARGIN_SUMS)
            .order_by("model_alias")
        ],
        by_day=[
            (first + timedelta(days=n), days.get(first + timedelta(days=n), empty))
            for n in range((last - first).days + 1)
        ],
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


def account_items_open(*, account_id: int, limit: int = 100) -> list[ReconciliationItem]:
    """The account's pending reconciliation items, oldest first (the account page lists them)."""
    return list(
        ReconciliationItem.objects.filter(
            account_id=account_id, status=ReconciliationItem.Status.PENDING
        ).order_by("created_at", "pk")[:limit]
    )
