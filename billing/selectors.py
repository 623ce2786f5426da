"""Reads: balances, statements, tariff selection, the ledger audit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import (
    Case,
    Count,
    DateTimeField,
    Exists,
    F,
    Func,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce, TruncDate

from billing.errors import AccountNotFound
from billing.models import (
    Account,
    ApiKey,
    Hold,
    LedgerLeg,
    LedgerTransaction,
    Tariff,
    UsageRecord,
)
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
    *,
    model_alias: str,
    purpose: str,
    completion_window: str,
    at: datetime,
    account_id: int | None = None,
) -> Tariff | None:
    candidates = Tariff.objects.filter(
        Q(account__isnull=True) | Q(account_id=account_id),
        Q(valid_until__isnull=True) | Q(valid_until__gt=at),
        model__alias=model_alias,
        valid_from__lte=at,
    )
    return tariff_choose(
        candidates,
        purpose=purpose,
        completion_window=completion_window,
        at=at,
        account_id=account_id,
    )


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


# --- The account page in the admin --------------------------------------------------------------

ACCOUNT_PAGE_ENTRIES = 50
ACCOUNT_PAGE_ROWS = 100  # keys and holds listed on the page; the full lists are a click away


@dataclass(frozen=True)
class UsageDay:
    """One UTC day of an account's usage records."""

    day: date
    requests: int
    tokens: int  # input, cached input, cache writes and output (reasoning is within output)
    cost: Decimal


@dataclass(frozen=True)
class AccountOverview:
    """What finance needs on one screen to answer a customer's ticket."""

    account: Account
    balance: Decimal  # cached for a customer; summed from the legs for a system account
    keys: list[ApiKey]
    active_holds: list[Hold]
    active_holds_count: int
    entries: list[LedgerLeg]  # newest first, with their transactions
    usage_by_day: list[UsageDay]  # oldest first, every day present

    @property
    def usage_requests(self) -> int:
        return sum(day.requests for day in self.usage_by_day)

    @property
    def usage_tokens(self) -> int:
        return sum(day.tokens for day in self.usage_by_day)

    @property
    def usage_cost(self) -> Decimal:
        return sum((day.cost for day in self.usage_by_day), ZERO)


def account_usage_by_day(*, account_id: int, now: datetime, days: int = 30) -> list[UsageDay]:
    """Requests, tokens and cost of the account's usage records per UTC day, the last `days`
    days up to and including today, zero-filled."""
    first = now.astimezone(UTC).date() - timedelta(days=days - 1)
    start = datetime.combine(first, time.min, tzinfo=UTC)
    rows = (
        UsageRecord.objects.filter(account_id=account_id, started_at__gte=start)
        .annotate(day=TruncDate("started_at", tzinfo=UTC))
        .values("day")
        .annotate(
            requests=Count("id"),
            # Output counts include reasoning tokens (billing.pricing.Usage).
            tokens=Sum(
                F("input_tokens")
                + F("cached_input_tokens")
                + F("cache_write_tokens")
                + F("output_tokens")
            ),
            cost=Sum("cost"),
        )
        .order_by("day")
    )
    found = {row["day"]: row for row in rows}
    out = []
    for n in range(days):
        day = first + timedelta(days=n)
        row = found.get(day)
        out.append(
            UsageDay(
                day=day,
                requests=row["requests"] if row else 0,
                tokens=(row["tokens"] or 0) if row else 0,
                cost=(row["cost"] or ZERO) if row else ZERO,
            )
        )
    return out


def account_overview_get(*, account_id: int, now: datetime) -> AccountOverview:
    """The account page's reads: keys, active holds, the last entries, 30 days of usage."""
    account = Account.objects.filter(pk=account_id).first()
    if account is None:
        raise AccountNotFound(f"no account {account_id}")
    holds = Hold.objects.filter(account_id=account_id, state=Hold.State.ACTIVE)
    balance = (
        account.balance
        if not account.is_system
        else LedgerLeg.objects.filter(account_id=account_id).aggregate(total=Sum("amount"))["total"]
        or ZERO
    )
    return AccountOverview(
        account=account,
        balance=balance,
        keys=list(
            ApiKey.objects.filter(account_id=account_id).order_by("status", "-created_at", "-pk")[
                :ACCOUNT_PAGE_ROWS
            ]
        ),
        active_holds=list(
            holds.select_related("api_key").order_by("created_at", "pk")[:ACCOUNT_PAGE_ROWS]
        ),
        active_holds_count=holds.count(),
        entries=list(account_entries(account_id=account_id, limit=ACCOUNT_PAGE_ENTRIES)),
        usage_by_day=account_usage_by_day(account_id=account_id, now=now),
    )


def tariff_current_exists(*, model_ref: str, at: datetime) -> Exists:
    """Whether the model at `model_ref` (an outer query's column) has a general tariff valid at
    `at`: an annotation, so a list of routes is flagged in one query."""
    return Exists(
        Tariff.objects.filter(
            Q(valid_until__isnull=True) | Q(valid_until__gt=at),
            model_id=OuterRef(model_ref),
            account__isnull=True,
            valid_from__lte=at,
        )
    )


# --- The account's own keys and requests (the self-service API) ---------------------------------


def account_keys(*, account_id: int, now: datetime) -> QuerySet[ApiKey]:
    """The account's keys, newest first. `period_spent` is what the budget's current period has
    spent: nothing yet if the period the key last spent in has ended (the engine rolls it over
    lazily, billing_engine.period_start)."""
    period_start = Func(
        F("budget_period"),
        Value(now, output_field=DateTimeField()),
        function="billing_engine.period_start",
        output_field=DateTimeField(),
    )
    return (
        ApiKey.objects.filter(account_id=account_id)
        .annotate(
            period_spent=Case(
                When(budget_period_start=period_start, then=F("budget_spent")),
                default=money_value(ZERO),
                output_field=MoneyField(),
            )
        )
        .order_by("-created_at", "-pk")
    )


def account_key_get(*, account_id: int, key_id: int, now: datetime) -> ApiKey | None:
    """One of the account's keys (None for another account's, as for no key at all)."""
    return account_keys(account_id=account_id, now=now).filter(pk=key_id).first()


def account_requests(
    *, account_id: int, first: date, last: date
) -> QuerySet[UsageRecord, Any]:
    """The account's requests (usage records) that started on the UTC days first..last, both
    included, newest first, as dicts: the record's fields, `key_prefix` and `model`."""
    start = datetime.combine(first, time.min, tzinfo=UTC)
    return (
        UsageRecord.objects.filter(
            account_id=account_id,
            started_at__gte=start,
            started_at__lt=start + timedelta(days=(last - first).days + 1),
        )
        .order_by("-started_at", "-pk")
        .values(
            "pk",
            "request_id",
            "started_at",
            "created_at",
            "endpoint",
            "stream",
            "input_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "output_tokens",
            "reasoning_tokens",
            "estimated",
            "cost",
            "outcome",
            key_prefix=F("api_key__prefix"),
            model=F("model_alias"),
        )
    )


def account_requests_chunks(
    *, account_id: int, first: date, last: date, chunk_size: int = 1000
) -> Iterator[list[dict[str, Any]]]:
    """account_requests in chunks, each one query (keyset: after the previous chunk's last
    start and id, on the (account, started_at) index), so a long range is read in flat
    memory."""
    records = account_requests(account_id=account_id, first=first, last=last)
    chunk = list(records[:chunk_size])
    while chunk:
        yield chunk
        if len(chunk) < chunk_size:
            return
        started, pk = chunk[-1]["started_at"], chunk[-1]["pk"]
        after = Q(started_at__lt=started) | Q(started_at=started, pk__lt=pk)
        chunk = list(records.filter(after)[:chunk_size])
