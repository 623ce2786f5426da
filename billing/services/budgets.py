"""Key budget periods: roll every key whose period has ended into the current one."""

from __future__ import annotations

from datetime import datetime

from billing.engine import engine_call, sql_rows

_KEY_BUDGETS_ROLL_SQL = engine_call("key_budgets_roll", ["now"])


def api_key_budgets_roll(*, now: datetime) -> int:
    """Reset budget_spent for keys whose stored period started before the current one, in one
    statement (billing_engine.key_budgets_roll). budget_held is left alone: holds placed in the
    old period are still open and count against the new one until they resolve. Returns the
    number of keys rolled over."""
    [(rolled,)] = sql_rows(_KEY_BUDGETS_ROLL_SQL, {"now": now})
    return int(rolled)
