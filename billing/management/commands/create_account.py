from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand, parse_amount
from billing.money import money_str
from billing.services.accounts import account_create


class Command(BillingCommand):
    help = "Create a customer account, optionally with opening credits (a grant) and an overdraft."

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("name")
        parser.add_argument("--credits", default="0", help="opening credits in USD (a grant)")
        parser.add_argument("--overdraft", default="0", help="allowed overdraft in USD")

    def run(self, **options: Any) -> dict[str, Any]:
        credits = parse_amount(options["credits"], what="--credits")
        overdraft = parse_amount(options["overdraft"], what="--overdraft")
        account = account_create(
            name=options["name"],
            credits=credits,
            overdraft=overdraft,
            now=timezone.now(),
        )
        return {
            "account_id": account.pk,
            "name": account.name,
            "balance": money_str(account.balance),
            "overdraft": money_str(account.overdraft),
        }

    def describe(self, result: dict[str, Any]) -> str:
        return (
            f"Created account {result['account_id']} ({result['name']}): "
            f"balance {result['balance']} USD, overdraft {result['overdraft']} USD"
        )
