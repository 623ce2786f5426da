from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand
from reconciliation.services.sweeps import holds_expire_and_queue


class Command(BillingCommand):
    help = (
        "Expire every active hold past its expiry (in batches) and queue each one that was "
        "never charged as an expired-hold reconciliation item."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--batch-size", type=int, default=5000, help="holds per transaction")

    def run(self, **options: Any) -> dict[str, Any]:
        return holds_expire_and_queue(now=timezone.now(), batch_size=max(1, options["batch_size"]))

    def describe(self, result: dict[str, Any]) -> str:
        return f"Expired {result['expired']} holds; queued {result['queued']} for reconciliation."
