from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from billing.management.base import BillingCommand
from reconciliation.services.failures import deduction_failures_requeue


class Command(BillingCommand):
    help = (
        "Queue the settle again for pending deduction failures whose request is still "
        "uncharged. Idempotent: a request is charged at most once whatever runs first."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--limit", type=int, default=None, help="at most this many items")

    def run(self, **options: Any) -> dict[str, Any]:
        return deduction_failures_requeue(limit=options["limit"])

    def describe(self, result: dict[str, Any]) -> str:
        return (
            f"Queued {result['enqueued']} settles; skipped {result['skipped']} already charged "
            f"or without a hold; {result['failed']} could not be queued."
        )
