from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from billing.management.base import BillingCommand, parse_amount
from billing.payments.services import alerts_set


class Command(BillingCommand):
    help = (
        "Set a customer account's balance alerts: balance.low below --low-balance USD, and every "
        "alert (balance.depleted, key.budget_threshold, payment.succeeded, payment.failed) sent "
        "to --webhook-url, signed as Standard Webhooks with a new secret printed once "
        "(webhook_secret), and to --email."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("account_id", type=int)
        parser.add_argument("--low-balance", help="USD; omit to keep, 'off' to clear")
        parser.add_argument("--webhook-url", help="http(s) URL; '' to clear")
        parser.add_argument("--email", help="billing email; '' to clear")

    def run(self, **options: Any) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        low = options["low_balance"]
        if low is not None:
            changes["low_balance_threshold"] = (
                None if low == "off" else parse_amount(low, what="--low-balance")
            )
        if options["webhook_url"] is not None:
            changes["webhook_url"] = options["webhook_url"]
        if options["email"] is not None:
            changes["billing_email"] = options["email"]
        alerts = alerts_set(
            account_id=options["account_id"],
            rotate_secret=bool(options["webhook_url"]),
            **changes,
        )
        return {"account_id": options["account_id"], **alerts.as_json()}

    def describe(self, result: dict[str, Any]) -> str:
        lines = [
            f"Account {result['account_id']}: low balance below "
            f"{result['low_balance_threshold'] or '(none)'} USD, webhook "
            f"{result['webhook_url'] or '(none)'}, email {result['billing_email'] or '(none)'}"
        ]
        if result["webhook_secret"]:
            lines.append(f"Webhook signing secret (shown once): {result['webhook_secret']}")
        return "\n".join(lines)
