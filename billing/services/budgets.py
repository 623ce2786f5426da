"""Key budgets: their rule, and rolling every key whose period has ended into the current one."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from billing.engine import engine_call, sql_rows
from billing.errors import InvalidAmount
from billing.models import ApiKey

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

