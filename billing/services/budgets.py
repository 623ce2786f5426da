"""Key budget periods: roll every key whose period has ended into the current one."""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.db.models import Q

from billing.models import ApiKey
from billing.money import ZERO
from billing.services.holds import budget_period_start


@transaction.atomic(durable=True)
def api_key_budgets_roll(*, now: datetime) -> int:
    """Reset budget_spent for keys whose stored period started before the current one.

    One set-based UPDATE per period kind. budget_held is left alone: holds placed in the old
    period are still open and count against the new one until they resolve (resetting them
    is the leak that gave users false "budget exceeded" errors). Placing a hold rolls a key
    over lazily too; this sweep makes the figures right for keys that are idle.
    Returns the number of keys rolled over.
    """
    rolled = 0
    for period in ApiKey.BudgetPeriod.values:
        start = budget_period_start(period=period, now=now)
        rolled += (
            ApiKey.objects.filter(budget_period=period)
            .filter(Q(budget_period_start__lt=start) | Q(budget_period_start__isnull=True))
            .update(budget_spent=ZERO, budget_period_start=start)
        )
    return rolled
