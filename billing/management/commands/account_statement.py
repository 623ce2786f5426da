from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from billing.management.base import BillingCommand
from billing.selectors import account_balance_get, account_entries, leg_as_json


class Command(BillingCommand):
    help = "Show an account's balance, held and available amounts and its latest ledger entries."

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("account_id", type=int)
        parser.add_argument("--limit", type=int, default=50, help="entries to show (newest first)")

    def run(self, **options: Any) -> dict[str, Any]:
        if options["limit"] < 1:
            raise CommandError("invalid --limit: must be at least 1")
        result: dict[str, Any] = account_balance_get(account_id=options["account_id"]).as_json()
        result["entries"] = [
            leg_as_json(leg)
            for leg in account_entries(account_id=options["account_id"], limit=options["limit"])
        ]
        return result

    def describe(self, result: dict[str, Any]) -> str:
        lines = [
            f"Account {result['account_id']} ({result['name']}, {result['status']}) "
            f"in {result['currency']}",
            f"  balance   {result['balance']}",
            f"  held      {result['held']}",
            f"  available {result['available']}  (overdraft {result['overdraft']})",
        ]
        for entry in result["entries"]:
            lines.append(
                f"  {entry['posted_at']}  {entry['kind']:<10} {entry['amount']:>22}  "
                f"txn {entry['transaction_id']}  {entry['request_id'] or entry['memo']}"
            )
        return "\n".join(lines)
