"""The app side of a gateway benchmark: seed the routes, prices and keys; check the billing.

Imports nothing from bench/, only the app, so bench/paired.py can run it in another checkout:
`python -c <this file's text> seed|check` with that checkout as the working directory and its
own database in DATABASE_URL, where that commit's own services seed and check their schema
(bench.common.side_run). The in-process benchmarks call the functions directly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

BENCH_MODEL = "bench-model"
BENCH_ANTHROPIC_MODEL = "bench-claude"
# A budget no benchmark run comes near (accounts hold 1,000,000 USD of credits): a budgeted key
# pays for the budget's bookkeeping on every hold and settle, and is never refused.
BUDGET_LIMIT_USD = "1000000"
BUDGET_PERIOD = "month"


def gateway_seed(
    *,
    openai_base_url: str,
    anthropic_base_url: str,
    accounts: int,
    budgeted_accounts: int = 0,
    credits: str = "1000000",
) -> dict[str, list[list[str]]]:
    """Route the bench models to the mock, price them, and create `accounts` customers with
    one unbudgeted key each and `budgeted_accounts` more with one budgeted key each
    (BUDGET_LIMIT_USD a month). Returns {"plain": [[account_id, secret], ...],
    "budgeted": [...]}. Needs Django set up."""
    from django.utils import timezone

    from billing.services.accounts import account_create
    from billing.services.keys import api_key_issue
    from billing.services.tariffs import tariff_set
    from gateway.services import model_route_set, upstream_add

    now = timezone.now()
    upstream_add(name="mock-openai", kind="openai", base_url=openai_base_url)
    upstream_add(name="mock-anthropic", kind="anthropic", base_url=anthropic_base_url)
    for alias, upstream in (
        (BENCH_MODEL, "mock-openai"),
        (BENCH_ANTHROPIC_MODEL, "mock-anthropic"),
    ):
        model_route_set(alias=alias, upstream_name=upstream, upstream_model="mock-model")
        tariff_set(
            model_alias=alias,
            input_per_mtok=Decimal("2.5"),
            output_per_mtok=Decimal("10"),
            valid_from=datetime(2020, 1, 1, tzinfo=UTC),
        )
    keys: dict[str, list[list[str]]] = {"plain": [], "budgeted": []}
    for group, count in (("plain", accounts), ("budgeted", budgeted_accounts)):
        budgeted = group == "budgeted"
        for i in range(count):
            name = f"bench-{group}-{i}"
            account = account_create(name=name, now=now, credits=Decimal(credits))
            issued = api_key_issue(
                account_id=account.pk,
                now=now,
                name=name,
                budget_limit=Decimal(BUDGET_LIMIT_USD) if budgeted else None,
                budget_period=BUDGET_PERIOD if budgeted else "",
            )
            keys[group].append([str(account.pk), issued.secret])
    return keys


def billing_check(*, expected_usage: int) -> dict[str, Any]:
    """After a gateway run: every successful request has exactly one usage posting, no hold
    is left active, the ledger audit is clean, and the budgeted keys hold nothing and have
    spent what their usage records cost (a run that crosses a month boundary would fail this:
    the budget rolls over)."""
    from django.db.models import Sum

    from billing.models import ApiKey, Hold, LedgerTransaction, UsageRecord
    from billing.selectors import ledger_audit

    usage = LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.USAGE).count()
    report = ledger_audit()
    active = Hold.objects.filter(state=Hold.State.ACTIVE).count()
    records = UsageRecord.objects.count()
    budgeted = ApiKey.objects.filter(budget_limit__isnull=False)
    totals = budgeted.aggregate(held=Sum("budget_held"), spent=Sum("budget_spent"))
    billed = UsageRecord.objects.filter(api_key__budget_limit__isnull=False).aggregate(
        cost=Sum("cost")
    )["cost"]
    budget_held, budget_spent, budget_billed = (
        Decimal(value or 0) for value in (totals["held"], totals["spent"], billed)
    )
    return {
        "usage_transactions": usage,
        "expected_usage_transactions": expected_usage,
        "usage_records": records,
        "active_holds": active,
        "audit_clean": report.clean,
        "audit_accounts_checked": report.accounts_checked,
        "budgeted_keys": budgeted.count(),
        "budget_held_left": str(budget_held),
        "budget_spent": str(budget_spent),
        "budgeted_usage_cost": str(budget_billed),
        "ok": usage == expected_usage
        and active == 0
        and report.clean
        and budget_held == 0
        and budget_spent == budget_billed,
    }


TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "seed": gateway_seed,
    "check": billing_check,
}


def main() -> None:
    """`seed` or `check`: keyword arguments as JSON on stdin, the result as JSON on stdout."""
    import django

    task = TASKS[sys.argv[1]]
    kwargs = json.loads(sys.stdin.read() or "{}")
    django.setup()
    sys.stdout.write(json.dumps(task(**kwargs)))


if __name__ == "__main__":
    main()
