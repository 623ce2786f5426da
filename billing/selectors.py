"""Reads: balances, statements, tariff selection, the ledger audit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce

from billing.errors import AccountNotFound
from billing.models import Account, Hold, LedgerLeg, LedgerTransaction, Tariff
from billing.money import ZERO, MoneyField, money_str, money_value
from billing.pricing import tariff_choose


@dataclass(frozen=True)
class AccountBalance:
    account_id: int
    name: str
    currency: str
    status: str
    balance: Decimal
    held: Decimal
    overdraft: Decimal

    @property
    def available(self) -> Decimal:
        return self.balance - self.held

    def as_json(self) -> dict[str, object]:
        return {
            "account_id": self.account_id,
            "name": self.name,
            "currency": self.currency,
            "status": self.status,
            "balance": money_str(self.balance),
            "held": money_str(self.held),
            "available": money_str(self.available),
            "overdraft": money_str(self.overdraft),
        }


def account_balance_get(*, account_id: int) -> AccountBalance:
    account = Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER).first()
    if account is None:
        raise AccountNotFound(f"no customer account {account_id}")
    return AccountBalance(
        account_id=account.pk,
        name=account.name,
        currency=account.currency,
        status=account.status,
        balance=account.balance,
        held=account.held,
        overdraft=account.overdraft,
    )


def account_entries(
    *, account_id: int, limit: int | None = 100, before_leg_id: int | None = None
) -> QuerySet[LedgerLeg]:
    """The account's legs, newest first, with their transactions (all of them if no limit)."""
    legs = LedgerLeg.objects.filter(account_id=account_id).select_related("transaction")
    if before_leg_id is not None:
        legs = legs.filter(pk__lt=before_leg_id)
    legs = legs.order_by("-pk")
    return legs if limit is None else legs[:limit]


def leg_as_json(leg: LedgerLeg) -> dict[str, object]:
    txn = leg.transaction
    return {
        "entry_id": leg.pk,
        "transaction_id": txn.pk,
        "kind": txn.kind,
        "amount": money_str(leg.amount),
        "request_id": txn.request_id or None,
        "model": txn.model_alias or None,
        "memo": txn.memo,
        "occurred_at": txn.occurred_at.isoformat(),
        "posted_at": txn.posted_at.isoformat(),
        "is_overrun": txn.is_overrun,
        "is_late": txn.is_late,
        "reverses": txn.reverses_id,
    }


def tariff_select(
    *, model_alias: str, purpose: str, completion_window: str, at: datetime
) -> Tariff | None:
    candidates = Tariff.objects.filter(
        Q(valid_until__isnull=True) | Q(valid_until__gt=at),
        model__alias=model_alias,
        valid_from__lte=at,
    )
    return tariff_choose(candidates, purpose=purpose, completion_window=completion_window, at=at)


def request_posting_get(*, request_id: str) -> LedgerTransaction | None:
    """The request's one posting, if it has one: its usage, or finance's write-off of it."""
    return (
        LedgerTransaction.objects.filter(
            request_id=request_id,
            kind__in=[LedgerTransaction.Kind.USAGE, LedgerTransaction.Kind.WRITE_OFF],
        )
        .order_by("pk")
        .first()
    )


@dataclass(frozen=True)
class AuditReport:
    accounts_checked: int
    mismatches: list[dict[str, object]]
    unbalanced_transactions: list[int]

    @property
    def clean(self) -> bool:
        return not self.mismatches and not self.unbalanced_transactions

    def as_json(self) -> dict[str, object]:
        return {
            "accounts_checked": self.accounts_checked,
            "mismatches": self.mismatches,
            "unbalanced_transactions": self.unbalanced_transactions,
            "ok": self.clean,
        }


def _accounts_with_ledger_totals() -> Iterator[Any]:
    legs_total = (
        LedgerLeg.objects.filter(account_id=OuterRef("pk"))
        .values("account_id")
        .annotate(total=Sum("amount"))
        .values("total")
    )
    holds_total = (
        Hold.objects.filter(account_id=OuterRef("pk"), state=Hold.State.ACTIVE)
        .values("account_id")
        .annotate(total=Sum("amount"))
        .values("total")
    )
    return (
        Account.objects.filter(kind=Account.Kind.CUSTOMER)
        .annotate(
            ledger_balance=Coalesce(
                Subquery(legs_total, output_field=MoneyField()), money_value(ZERO)
            ),
            active_holds=Coalesce(
                Subquery(holds_total, output_field=MoneyField()), money_value(ZERO)
            ),
        )
        .values("pk", "balance", "held", "ledger_balance", "active_holds")
        .order_by("pk")
        .iterator(chunk_size=2000)
    )


def ledger_audit() -> AuditReport:
    """Recompute every cached balance and hold total from the source rows."""
    checked = 0
    mismatches: list[dict[str, object]] = []
    for row in _accounts_with_ledger_totals():
        checked += 1
        if row["balance"] != row["ledger_balance"] or row["held"] != row["active_holds"]:
            mismatches.append(
                {
                    "account_id": row["pk"],
                    "cached_balance": money_str(row["balance"]),
                    "ledger_balance": money_str(row["ledger_balance"]),
                    "cached_held": money_str(row["held"]),
                    "active_holds": money_str(row["active_holds"]),
                }
            )
    unbalanced = list(
        LedgerLeg.objects.values("transaction_id")
        .annotate(total=Sum("amount"), legs=Count("id", output_field=IntegerField()))
        .filter(~Q(total=Value(0, output_field=MoneyField())) | Q(legs__lt=2))
        .order_by("transaction_id")
        .values_list("transaction_id", flat=True)
    )
    return AuditReport(
        accounts_checked=checked, mismatches=mismatches, unbalanced_transactions=unbalanced
    )


def system_balances() -> dict[str, Decimal]:
    """Trial balance of the system accounts (summed from legs: they have no cached balance)."""
    rows = (
        LedgerLeg.objects.filter(
            account__kind__in=[k for k in Account.Kind.values if k != "customer"]
        )
        .values("account__kind")
        .annotate(total=Sum("amount"))
    )
    return {row["account__kind"]: row["total"] for row in rows}


def usage_totals(
    *, account_id: int, start: datetime, end: datetime
) -> dict[str, list[dict[str, object]]]:
    """Usage records of [start, end) summed by UTC day and by model."""
    from django.db.models.functions import TruncDate

    from billing.models import UsageRecord

    records = UsageRecord.objects.filter(
        account_id=account_id, started_at__gte=start, started_at__lt=end
    )
    sums = {
        "requests": Count("id"),
        "input_tokens": Sum("input_tokens"),
        "cached_input_tokens": Sum("cached_input_tokens"),
        "cache_write_tokens": Sum("cache_write_tokens"),
        "output_tokens": Sum("output_tokens"),
        "reasoning_tokens": Sum("reasoning_tokens"),
        "cost": Sum("cost"),
    }

    def rows(group: str) -> list[dict[str, object]]:
        out = []
        for row in records.values(group).annotate(**sums).order_by(group):
            row["cost"] = money_str(row["cost"] or ZERO)
            if group == "day":
                row["day"] = row["day"].isoformat()
            out.append(row)
        return out

    records = records.annotate(day=TruncDate("started_at"))
    by_model = [{"model": row.pop("model_alias"), **row} for row in rows("model_alias")]
    return {"by_day": rows("day"), "by_model": by_model}
