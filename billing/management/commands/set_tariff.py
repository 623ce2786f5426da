from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand, parse_amount, parse_when
from billing.models import ApiKey
from billing.money import money_str
from billing.services.tariffs import tariff_set

OPTIONAL_PRICES = ("cached_input_per_mtok", "cache_write_per_mtok", "reasoning_per_mtok")


class Command(BillingCommand):
    help = (
        "Add a tariff (USD per million tokens) for a model alias, creating the model if needed. "
        "A price change is a new tariff with a later --valid-from; old usage keeps its price."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("model", help="model alias as clients send it")
        parser.add_argument("--input-per-mtok", required=True)
        parser.add_argument("--output-per-mtok", required=True)
        parser.add_argument("--cached-input-per-mtok", help="cache reads (default: input price)")
        parser.add_argument("--cache-write-per-mtok", help="cache writes (default: input price)")
        parser.add_argument("--reasoning-per-mtok", help="reasoning tokens (default: output price)")
        parser.add_argument(
            "--purpose",
            default=ApiKey.Purpose.REALTIME,
            help="realtime (default), batch, playground or platform",
        )
        parser.add_argument("--completion-window", default="")
        parser.add_argument("--valid-from", help="ISO 8601 (default: now; naive means UTC)")
        parser.add_argument("--valid-until", help="ISO 8601, exclusive (default: open-ended)")

    def run(self, **options: Any) -> dict[str, Any]:
        if options["purpose"] not in ApiKey.Purpose.values:
            raise CommandError(
                f"invalid --purpose {options['purpose']!r}: "
                f"choose one of {', '.join(ApiKey.Purpose.values)}"
            )
        prices = {
            name: parse_amount(options[name], what=f"--{name.replace('_', '-')}")
            for name in ("input_per_mtok", "output_per_mtok")
        }
        optional = {
            name: None
            if options[name] is None
            else parse_amount(options[name], what=f"--{name.replace('_', '-')}")
            for name in OPTIONAL_PRICES
        }
        valid_from = (
            timezone.now()
            if options["valid_from"] is None
            else parse_when(options["valid_from"], what="--valid-from")
        )
        valid_until = (
            None
            if options["valid_until"] is None
            else parse_when(options["valid_until"], what="--valid-until")
        )
        tariff = tariff_set(
            model_alias=options["model"],
            purpose=options["purpose"],
            completion_window=options["completion_window"],
            valid_from=valid_from,
            valid_until=valid_until,
            input_per_mtok=prices["input_per_mtok"],
            output_per_mtok=prices["output_per_mtok"],
            cached_input_per_mtok=optional["cached_input_per_mtok"],
            cache_write_per_mtok=optional["cache_write_per_mtok"],
            reasoning_per_mtok=optional["reasoning_per_mtok"],
        )
        result: dict[str, Any] = {
            "tariff_id": tariff.pk,
            "model": options["model"].strip(),
            "purpose": tariff.purpose,
            "completion_window": tariff.completion_window,
            "valid_from": tariff.valid_from.isoformat(),
            "valid_until": tariff.valid_until.isoformat() if tariff.valid_until else None,
            "input_per_mtok": money_str(tariff.input_per_mtok),
            "output_per_mtok": money_str(tariff.output_per_mtok),
        }
        for name in OPTIONAL_PRICES:
            value = getattr(tariff, name)
            result[name] = None if value is None else money_str(value)
        return result

    def describe(self, result: dict[str, Any]) -> str:
        window = f"/{result['completion_window']}" if result["completion_window"] else ""
        return (
            f"Tariff {result['tariff_id']} for {result['model']} ({result['purpose']}{window}): "
            f"input {result['input_per_mtok']}, output {result['output_per_mtok']} USD/Mtok, "
            f"valid from {result['valid_from']}"
            + (f" until {result['valid_until']}" if result["valid_until"] else "")
        )
