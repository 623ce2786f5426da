"""Monthly statements (reads): an account's movements in one UTC calendar month, from the ledger.

A movement belongs to the month of its ledger posting time (`LedgerTransaction.posted_at`,
UTC), not to when its request started: usage settled late, after the month closed, is in the
next month's statement. So a closed month never changes, and

    closing balance = opening balance + the sum of the month's movements

holds exactly, whatever arrived late (each statement says so). The current month gives a
provisional statement up to now, whose closing balance is the current balance.

Provider cost (what requests cost us upstream) is never read here: a statement is the
customer's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, Q, Sum
from django.template.loader import render_to_string

from billing.errors import AccountNotFound, InvalidAmount
from billing.models import Account, Hold, LedgerLeg, LedgerTransaction, Statement, UsageRecord
from billing.money import ZERO, money_str

BASIS = (
    "Movements are listed by their ledger posting time (UTC): usage settled after a month "
    "ended appears in the next month's statement."
)
# The kinds listed one by one, in the statement's order; any other kind is listed as `other`.
LISTED_KINDS = {
    LedgerTransaction.Kind.PURCHASE: "purchases",
    LedgerTransaction.Kind.GRANT: "grants",
    LedgerTransaction.Kind.REFUND: "refunds",
    LedgerTransaction.Kind.ADJUSTMENT: "adjustments",
    LedgerTransaction.Kind.REVERSAL: "reversals",
}
TOKEN_CLASSES = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)
_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def month_parse(raw: str) -> date:
    """`2026-11` as the first day of that month, or InvalidAmount."""
    found = _MONTH.match(raw.strip())
    if found is None:
        raise InvalidAmount(f"invalid month {raw!r}: expected YYYY-MM, like 2026-11")
    return date(int(found[1]), int(found[2]), 1)


def month_next(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def month_previous(month: date) -> date:
    return date(month.year - (month.month == 1), (month.month - 2) % 12 + 1, 1)


def month_start(month: date) -> datetime:
    return datetime(month.year, month.month, 1, tzinfo=UTC)


def _entry(txn: LedgerTransaction, amount: Decimal) -> dict[str, Any]:
    return {
        "transaction_id": txn.pk,
        "posted_at": txn.posted_at.isoformat(),
        "kind": txn.kind,
        "amount": money_str(amount),
        "memo": txn.memo,
        "request_id": txn.request_id or None,
    }


def _balance_before(*, account_id: int, at: datetime) -> Decimal:
    total = LedgerLeg.objects.filter(
        account_id=account_id, transaction__posted_at__lt=at
    ).aggregate(total=Sum("amount"))["total"]
    return total if total is not None else ZERO


def _usage_by_model(*, account_id: int, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Usage postings of the month by model: requests charged, tokens by class (from their
    usage records: a request finance charged without one counts no tokens), cost."""
    postings = LedgerLeg.objects.filter(
        account_id=account_id,
        transaction__kind=LedgerTransaction.Kind.USAGE,
        transaction__posted_at__gte=start,
        transaction__posted_at__lt=end,
    )
    charged = {
        row["transaction__model_alias"]: row
        for row in postings.values("transaction__model_alias").annotate(
            requests=Count("id"), total=Sum("amount")
        )
    }
    tokens: dict[str, Mapping[str, Any]] = {
        row["model_alias"]: row
        for row in UsageRecord.objects.filter(
            request_id__in=postings.values("transaction__request_id"), account_id=account_id
        )
        .values("model_alias")
        .annotate(**{name: Sum(name) for name in TOKEN_CLASSES})
    }
    return [
        {
            "model": model,
            "requests": row["requests"],
            **{name: (tokens.get(model) or {}).get(name) or 0 for name in TOKEN_CLASSES},
            "cost": money_str(-row["total"]),
        }
        for model, row in sorted(charged.items())
    ]


def _write_offs(*, account_id: int, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The account's requests finance wrote off in the month: not charged to it (the loss is
    ours, on the write-offs account), listed so the customer sees what was forgiven."""
    txns = LedgerTransaction.objects.filter(
        Q(request_id__in=Hold.objects.filter(account_id=account_id).values("request_id"))
        | Q(legs__account_id=account_id),
        kind=LedgerTransaction.Kind.WRITE_OFF,
        posted_at__gte=start,
        posted_at__lt=end,
    ).distinct()
    rows = []
    for txn in txns.prefetch_related("legs").order_by("posted_at", "pk"):
        legs = list(txn.legs.all())
        written_off = sum((-leg.amount for leg in legs if leg.amount < 0), ZERO)
        effect = sum((leg.amount for leg in legs if leg.account_id == account_id), ZERO)
        rows.append(
            {
                **_entry(txn, written_off),
                "model": txn.model_alias or None,
                "balance_effect": money_str(effect),
            }
        )
    return rows


@dataclass(frozen=True)
class StatementFigures:
    """A statement's figures as JSON data (decimal strings), ready to show, store or send."""

    data: dict[str, Any]

    @property
    def opening_balance(self) -> Decimal:
        return Decimal(self.data["opening_balance"])

    @property
    def closing_balance(self) -> Decimal:
        return Decimal(self.data["closing_balance"])


def statement_figures_get(*, account_id: int, month: date, now: datetime) -> StatementFigures:
    """The account's statement for `month` (a first day), computed from the ledger as of now:
    final for a month that has ended, provisional (up to `now`) for the current one."""
    account = Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER).first()
    if account is None:
        raise AccountNotFound(f"no customer account {account_id}")
    start = month_start(month)
    if start > now:
        raise InvalidAmount(f"{month:%Y-%m} has not started yet")
    end = month_start(month_next(month))
    provisional = end > now
    period_end = now if provisional else end

    opening = _balance_before(account_id=account_id, at=start)
    lists: dict[str, list[dict[str, Any]]] = {name: [] for name in LISTED_KINDS.values()}
    lists["other"] = []
    totals: dict[str, Decimal] = {name: ZERO for name in [*lists, "usage", "write_offs"]}
    legs = (
        LedgerLeg.objects.filter(
            account_id=account_id,
            transaction__posted_at__gte=start,
            transaction__posted_at__lt=period_end,
        )
        .select_related("transaction")
        .order_by("transaction__posted_at", "pk")
    )
    movements = ZERO
    for leg in legs.iterator(chunk_size=2000):
        movements += leg.amount
        kind = leg.transaction.kind
        if kind == LedgerTransaction.Kind.USAGE:
            totals["usage"] += leg.amount  # listed by model below, not one by one
        elif kind == LedgerTransaction.Kind.WRITE_OFF:
            totals["write_offs"] += leg.amount  # listed with the write-offs below
        else:
            name = LISTED_KINDS.get(kind, "other")  # type: ignore[call-overload]
            lists[name].append(_entry(leg.transaction, leg.amount))
            totals[name] += leg.amount
    closing = opening + movements
    assert sum(totals.values(), ZERO) == movements  # every movement is in exactly one total
    usage = _usage_by_model(account_id=account_id, start=start, end=period_end)
    return StatementFigures(
        data={
            "account_id": account.pk,
            "account_name": account.name,
            "currency": account.currency,
            "month": f"{month:%Y-%m}",
            "period_start": start.isoformat(),
            "period_end": period_end.isoformat(),
            "provisional": provisional,
            "basis": BASIS,
            "opening_balance": money_str(opening),
            "closing_balance": money_str(closing),
            "movements_total": money_str(movements),
            **lists,
            "usage": {
                "by_model": usage,
                "requests": sum(row["requests"] for row in usage),
                "cost": money_str(-totals["usage"]),
            },
            "write_offs": _write_offs(account_id=account_id, start=start, end=period_end),
            "totals": {name: money_str(total) for name, total in totals.items()},
            "issued_at": None,
            "generated_at": now.isoformat(),
        }
    )


def statement_get(
    *, account_id: int, month: date, now: datetime
) -> tuple[StatementFigures, bytes | None]:
    """The issued statement (its figures and PDF, as issued) if there is one; else the
    figures computed now (and no PDF yet)."""
    issued = Statement.objects.filter(account_id=account_id, month=month).first()
    if issued is not None:
        return StatementFigures(data=issued.figures), bytes(issued.pdf)
    return statement_figures_get(account_id=account_id, month=month, now=now), None


def statement_months(*, account_id: int, now: datetime, count: int = 12) -> list[dict[str, Any]]:
    """The last `count` months up to the current one, newest first, each with whether it was
    issued: what the admin links to."""
    issued = set(Statement.objects.filter(account_id=account_id).values_list("month", flat=True))
    month = date(now.year, now.month, 1)
    months = []
    for _ in range(count):
        months.append({"month": f"{month:%Y-%m}", "issued": month in issued})
        month = month_previous(month)
    return months


# --- rendering -------------------------------------------------------------------------------


def _readable(amount: str) -> str:
    """An exact amount without the trailing zeros of its ten places (at least two kept)."""
    value = Decimal(amount)
    text = format(value.normalize(), "f")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def _display(data: Any) -> Any:
    """The figures with every amount readable (exact, trailing zeros trimmed)."""
    if isinstance(data, dict):
        return {
            key: _readable(value)
            if isinstance(value, str) and key in _AMOUNT_KEYS
            else _display(value)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [_display(item) for item in data]
    return data


_AMOUNT_KEYS = frozenset(
    {"amount", "cost", "balance_effect", "opening_balance", "closing_balance", "movements_total"}
)


def statement_context(figures: StatementFigures) -> dict[str, Any]:
    data = _display(figures.data)
    data["totals"] = {key: _readable(value) for key, value in figures.data["totals"].items()}
    end = datetime.fromisoformat(figures.data["period_end"])
    data["closing_as_of"] = (
        f"so far, {end:%Y-%m-%d %H:%M} UTC"
        if figures.data["provisional"]
        else f"{end - timedelta(days=1):%Y-%m-%d}, end of day"
    )
    for rows in [*(data[name] for name in [*LISTED_KINDS.values(), "other"]), data["write_offs"]]:
        for row in rows:
            row["posted_at"] = f"{datetime.fromisoformat(row['posted_at']):%Y-%m-%d %H:%M:%S}"
    titles = [*(name.capitalize() for name in LISTED_KINDS.values()), "Other movements"]
    names = [*LISTED_KINDS.values(), "other"]
    return {
        "statement": data,
        "statement_lists": [(title, data[name]) for title, name in zip(titles, names, strict=True)],
    }


def statement_html(figures: StatementFigures) -> str:
    """The statement as a standalone HTML page (what the PDF is rendered from)."""
    return render_to_string("billing/statement_pdf.html", statement_context(figures))


def statement_pdf(figures: StatementFigures) -> bytes:
    """The statement as PDF (WeasyPrint). Rendered from the figures alone: the same figures
    render the same pages."""
    import weasyprint  # loads Pango: only where a PDF is wanted

    pdf: bytes = weasyprint.HTML(string=statement_html(figures)).write_pdf()
    return pdf
