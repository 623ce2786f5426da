from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand
from billing.services.tariffs import RoutedModel, provider_prices_propose
from gateway.selectors import routed_models


class Command(BillingCommand):
    help = (
        "Propose each routed model's current price from the genai-prices catalogue (shipped "
        "with the package: offline) as its provider price. Finance accepts or rejects each "
        "proposal in the admin; nothing is priced by a proposal."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--provider",
            help="the catalogue's provider id for every model (default: each route's upstream "
            "kind, openai or anthropic)",
        )

    def run(self, **options: Any) -> dict[str, Any]:
        report = provider_prices_propose(
            models=[
                RoutedModel(alias=alias, provider=kind, upstream_model=upstream_model)
                for alias, kind, upstream_model in routed_models()
            ],
            provider=options["provider"] or None,
            now=timezone.now(),
        )
        return report.as_json()

    def describe(self, result: dict[str, Any]) -> str:
        unknown = ", ".join(result["unknown_models"]) or "none"
        return (
            f"{result['proposed']} provider prices proposed for review in the admin, "
            f"{result['unchanged']} unchanged; not in the catalogue: {unknown}"
        )
