from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand, parse_amount, parse_when
from billing.models import ApiKey
from billing.money import money_str
from billing.services.tariffs import tariff_set, tariff_set_marked_up

OPTIONAL_PRICES = ("cached_input_per_mtok", "cache_write_per_mtok", "reasoning_per_mtok")
PRICES = ("input_per_mtok", "output_per_mtok", *OPTIONAL_PRICES)


def parse_percent(raw: str) -> Decimal:
    """A markup in percent, exact (Decimal); negative is a discount, above -100."""
    try:
        percent = Decimal(raw.strip())
    except InvalidOperation as exc:
        raise CommandError(f"invalid --markup-percent: {raw!r} is not a number") from exc
    if not percent.is_finite() or percent <= -100:
        raise CommandError(f"invalid --markup-percent: {raw!r} must be a number above -100")
    return percent


def add_price_arguments(parser: CommandParser, *, required_help: str) -> None:
    """The per-million-token price arguments and the validity window (set_provider_price's
    too)."""
    parser.add_argument("--input-per-mtok", help=required_help)
    parser.add_argument("--output-per-mtok", help=required_help)
    parser.add_argument("--cached-input-per-mtok", help="cache reads (default: input price)")
    parser.add_argument("--cache-write-per-mtok", help="cache writes (default: input price)")
    parser.add_argument("--reasoning-per-mtok", help="reasoning tokens (default: output price)")
    parser.add_argument("--valid-from", help="ISO 8601 (default: now; naive means UTC)")
    parser.add_argument("--valid-until", help="ISO 8601, exclusive (default: open-ended)")


def parse_prices(options: dict[str, Any], *, alternative: str = "") -> dict[str, Any]:
    """The given prices (unset optional ones None); input and output are required."""
    for name in ("input_per_mtok", "output_per_mtok"):
        if options[name] is None:
            raise CommandError(f"--{name.replace('_', '-')} is required{alternative}")
    return {
        name: None
        if options[name] is None
        else parse_amount(options[name], what=f"--{name.replace('_', '-')}")
        for name in PRICES
    }


def parse_validity(options: dict[str, Any]) -> tuple[datetime, datetime | None]:
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
    return valid_from, valid_until


class Command(BillingCommand):
    help = (
        "Add a tariff (USD per million tokens) for a model alias, creating the model if needed. "
        "A price change is a new tariff with a later --valid-from; old usage keeps its price. "
        "--markup-percent derives the prices from the model's provider price instead; "
        "--account makes it one customer's negotiated price."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("model", help="model alias as clients send it")
        add_price_arguments(parser, required_help="required unless --markup-percent")
        parser.add_argument(
            "--markup-percent",
            help="sell at the provider price in force at --valid-from plus this percent, "
            "every token class (instead of the --*-per-mtok prices)",
        )
        parser.add_argument(
            "--account", type=int, help="a customer account id: its own negotiated price"
        )
        parser.add_argument(
            "--purpose",
            default=ApiKey.Purpose.REALTIME,
            help="realtime (default), batch, playground or platform",
        )
        parser.add_argument("--completion-window", default="")

    def run(self, **options: Any) -> dict[str, Any]:
        if options["purpose"] not in ApiKey.Purpose.values:
            raise CommandError(
                f"invalid --purpose {options['purpose']!r}: "
                f"choose one of {', '.join(ApiKey.Purpose.values)}"
            )
        valid_from, valid_until = parse_validity(options)
        common: dict[str, Any] = {
            "model_alias": options["model"],
            "purpose": options["purpose"],
            "completion_window": options["completion_window"],
            "valid_from": valid_from,
            "valid_until": valid_until,
            "account_id": options["account"],
        }
        if options["markup_percent"] is not None:
            given = [name for name in PRICES if options[name] is not None]
            if given:
                raise CommandError(
                    f"--markup-percent derives every price: drop --{given[0].replace('_', '-')}"
                )
            tariff = tariff_set_marked_up(
                markup_percent=parse_percent(options["markup_percent"]), **common
            )
        else:
            rates = parse_prices(options, alternative=" (or give --markup-percent)")
            tariff = tariff_set(**common, **rates)
        result: dict[str, Any] = {
            "tariff_id": tariff.pk,
            "account_id": tariff.account_id,
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
        who = f" for account {result['account_id']}" if result["account_id"] else ""
        return (
            f"Tariff {result['tariff_id']} for {result['model']}{who} "
            f"({result['purpose']}{window}): "
            f"input {result['input_per_mtok']}, output {result['output_per_mtok']} USD/Mtok, "
            f"valid from {result['valid_from']}"
            + (f" until {result['valid_until']}" if result["valid_until"] else "")
        )
