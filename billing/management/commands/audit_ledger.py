from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from billing.management.base import BillingCommand
from billing.selectors import ledger_audit


class Command(BillingCommand):
    help = (
        "Recompute every cached balance and hold total from the ledger and check every "
        "transaction balances. Exits non-zero if anything is off."
    )

    def run(self, **options: Any) -> dict[str, Any]:
        return ledger_audit().as_json()

    def describe(self, result: dict[str, Any]) -> str:
        lines = [f"Checked {result['accounts_checked']} accounts."]
        for row in result["mismatches"]:
            lines.append(
                f"  account {row['account_id']}: cached balance {row['cached_balance']} vs ledger "
                f"{row['ledger_balance']}, cached held {row['cached_held']} vs active holds "
                f"{row['active_holds']}"
            )
        if result["unbalanced_transactions"]:
            ids = ", ".join(str(txn) for txn in result["unbalanced_transactions"])
            lines.append(f"  unbalanced transactions: {ids}")
        lines.append("Ledger OK." if result["ok"] else "Ledger audit FAILED.")
        return "\n".join(lines)

    def after_output(self, result: dict[str, Any]) -> None:
        if not result["ok"]:
            raise CommandError(
                f"ledger audit failed: {len(result['mismatches'])} balance mismatches, "
                f"{len(result['unbalanced_transactions'])} unbalanced transactions",
                returncode=2,
            )
