from __future__ import annotations

from typing import Any

from django.utils import timezone

from billing.management.base import BillingCommand
from billing.services.budgets import api_key_budgets_roll


class Command(BillingCommand):
    help = "Start a new budget period for every API key whose period has ended (spend to zero)."

    def run(self, **options: Any) -> dict[str, Any]:
        return {"rolled": api_key_budgets_roll(now=timezone.now())}

    def describe(self, result: dict[str, Any]) -> str:
        return f"Rolled over {result['rolled']} key budgets."
