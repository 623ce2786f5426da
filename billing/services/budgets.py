"""Key budgets: their rules, finance's edit, and rolling every key whose period has ended into
the current one."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import transaction

from billing.engine import engine_call, sql_rows
from billing.errors import AccountNotFound, InvalidAmount
from billing.models import ApiKey
from billing.money import money_str

_KEY_BUDGETS_ROLL_SQL = engine_call("key_budgets_roll", ["now"])


def api_key_budgets_roll(*, now: datetime) -> int:
    """Reset budget_spent for keys whose stored period started before the current one, in one
    statement (billing_engine.key_budgets_roll). budget_held is left alone: holds placed in the
    old period are still open and count against the new one until they resolve. Returns the
    number of keys rolled over."""
    [(rolled,)] = sql_rows(_KEY_BUDGETS_ROLL_SQL, {"now": now})
    return int(rolled)


def api_key_budget_check(*, budget_limit: Decimal | None, budget_period: str) -> None:
    """A key's budget is an amount and a period together, or neither (issue and edit alike)."""
    if (budget_limit is None) != (not budget_period):
        raise InvalidAmount("a budget needs both an amount and a period")
    if budget_period and budget_period not in ApiKey.BudgetPeriod.values:
        raise InvalidAmount(f"unknown budget period {budget_period!r}")
    if budget_limit is not None and budget_limit < 0:
        raise InvalidAmount("a budget cannot be negative")


def api_key_budget_set_locked(
    *, key_id: int, budget_limit: Decimal | None, budget_period: str
) -> tuple[ApiKey, dict[str, str | None]]:
    """Change a key's budget inside the caller's transaction (finance's, which records the
    StaffAction in it), under the key's row lock; returns the key and the budget it had.

    Spend and holds are kept: the new limit applies to what the period has used so far, and a
    changed period counts from its current start at the next hold or settle (the engine's
    lazy rollover), like any period that ends. Holds placed without a budget stay outside it.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("api_key_budget_set_locked needs the caller's transaction")
    api_key_budget_check(budget_limit=budget_limit, budget_period=budget_period)
    try:
        api_key = ApiKey.objects.select_for_update().get(pk=key_id)
    except ApiKey.DoesNotExist as exc:
        raise AccountNotFound(f"no API key {key_id}") from exc
    before = {
        "budget_limit": None if api_key.budget_limit is None else money_str(api_key.budget_limit),
        "budget_period": api_key.budget_period,
    }
    api_key.budget_limit = budget_limit
    api_key.budget_period = budget_period
    api_key.save(update_fields=["budget_limit", "budget_period"])
    return api_key, before
