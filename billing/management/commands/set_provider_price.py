from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from billing.management.base import BillingCommand
from billing.management.commands.set_tariff import (
    PRICES,
    add_price_arguments,
    parse_prices,
    parse_validity,
)
from billing.money import money_str
from billing.pricing import Price
from billing.services.tariffs import provider_price_set


class Command(BillingCommand):
    help = (
        "Set what a model costs us upstream (USD per million tokens), by hand, from --valid-from "
        "on: the provider cost recorded on each usage record. Never charged to a customer."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("model", help="model alias as clients send it")
        add_price_arguments(parser, required_help="required")
        parser.add_argument("--provider", default="", help="the provider's name, for the record")

    def run(self, **options: Any) -> dict[str, Any]:
        valid_from, valid_until = parse_validity(options)
        price = provider_price_set(
            model_alias=options["model"],
            price=Price(**parse_prices(options)),
            valid_from=valid_from,
            valid_until=valid_until,
            provider=options["provider"],
        )
        result: dict[str, Any] = {
            "provider_price_id": price.pk,
            "model": options["model"].strip(),
            "provider": price.provider,
            "valid_from": price.valid_from.isoformat(),
            "valid_until": price.valid_until.isoformat() if price.valid_until else None,
        }
        for name in PRICES:
            value = getattr(price, name)
            result[name] = None if value is None else money_str(value)
        return result

    def describe(self, result: dict[str, Any]) -> str:
        return (
            f"Provider price {result['provider_price_id']} for {result['model']}: input "
            f"{result['input_per_mtok']}, output {result['output_per_mtok']} USD/Mtok, valid "
            f"from {result['valid_from']}"
        )
