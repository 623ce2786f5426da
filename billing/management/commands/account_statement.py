from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand
from billing.selectors import account_balance_get, account_entries, leg_as_json
from billing.statements import month_parse, statement_get, statement_pdf


class Command(BillingCommand):
    help = (
        "Show an account's balance, held and available amounts and its latest ledger entries; "
        "with --month, its monthly statement (--pdf FILE writes it as PDF)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("account_id", type=int)
        parser.add_argument("--limit", type=int, default=50, help="entries to show (newest first)")
        parser.add_argument(
            "--month", help="YYYY-MM (UTC): the statement of that month (the current one: so far)"
        )
        parser.add_argument("--pdf", metavar="FILE", help="with --month: write the PDF here")

    def run(self, **options: Any) -> dict[str, Any]:
        if options["month"] is not None:
            return self._statement(**options)
        if options["pdf"] is not None:
            raise CommandError("--pdf needs --month")
        if options["limit"] < 1:
            raise CommandError("invalid --limit: must be at least 1")
        result: dict[str, Any] = account_balance_get(account_id=options["account_id"]).as_json()
        result["entries"] = [
            leg_as_json(leg)
            for leg in account_entries(account_id=options["account_id"], limit=options["limit"])
        ]
        return result

    def _statement(self, **options: Any) -> dict[str, Any]:
        figures, pdf = statement_get(
            account_id=options["account_id"],
            month=month_parse(options["month"]),
            now=timezone.now(),
        )
        if options["pdf"] is not None:
            Path(options["pdf"]).write_bytes(pdf if pdf is not None else statement_pdf(figures))
        return figures.data

    def describe(self, result: dict[str, Any]) -> str:
        if "closing_balance" in result:
            state = " (provisional)" if result["provisional"] else ""
            return (
                f"Statement {result['month']}{state} of account {result['account_id']}: opening "
                f"{result['opening_balance']}, movements {result['movements_total']}, closing "
                f"{result['closing_balance']} {result['currency']}"
            )
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
