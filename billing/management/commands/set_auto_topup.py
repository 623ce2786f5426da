from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from billing.management.base import BillingCommand, parse_amount
from billing.payments.services import auto_topup_set


class Command(BillingCommand):
    help = (
        "Set a customer account's auto top-up: when a settle leaves its available balance below "
        "--threshold, charge --amount USD to the payment method its first checkout saved, never "
        "more than --monthly-limit USD in a calendar month (UTC). --off disables it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("account_id", type=int)
        parser.add_argument("--threshold", help="USD: top up when available falls below this")
        parser.add_argument("--amount", help="USD charged per top-up")
        parser.add_argument("--monthly-limit", help="USD: at most this much per calendar month")
        parser.add_argument("--off", action="store_true", help="disable auto top-up")

    def run(self, **options: Any) -> dict[str, Any]:
        def amount(name: str) -> Any:
            raw = options[name]
            return None if raw is None else parse_amount(raw, what=f"--{name.replace('_', '-')}")

        settings = auto_topup_set(
            account_id=options["account_id"],
            enabled=not options["off"],
            threshold=amount("threshold"),
            amount=amount("amount"),
            monthly_limit=amount("monthly_limit"),
        )
        return {"account_id": options["account_id"], **settings.as_json()}

    def describe(self, result: dict[str, Any]) -> str:
        if not result["enabled"]:
            return f"Auto top-up is off for account {result['account_id']}"
        return (
            f"Account {result['account_id']}: below {result['auto_topup_threshold']} USD, top up "
            f"{result['auto_topup_amount']} USD, at most {result['auto_topup_monthly_limit']} USD "
            "a month"
        )
