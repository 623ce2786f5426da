from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand, parse_amount, parse_when
from billing.models import ApiKey
from billing.money import money_str
from billing.services.keys import api_key_issue


class Command(BillingCommand):
    help = "Issue an API key for an account. The secret is printed once and never stored."

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("account_id", type=int)
        parser.add_argument("--name", default="")
        parser.add_argument(
            "--purpose",
            default=ApiKey.Purpose.REALTIME,
            help="realtime (default), batch, playground or platform",
        )
        parser.add_argument(
            "--scope",
            default=ApiKey.Scope.INFERENCE,
            help="inference (default: completions and /v1/billing/ reads) or admin (also the "
            "account's /v1/keys)",
        )
        parser.add_argument("--rpm", type=int, help="at most this many requests in any 60 s")
        parser.add_argument(
            "--tpm", type=int, help="billed tokens (input plus output) per 60 s before refusing"
        )
        parser.add_argument("--budget", help="spend limit in USD per --budget-period")
        parser.add_argument("--budget-period", default="", help="day, week or month (UTC)")
        parser.add_argument("--expires", help="ISO 8601 expiry (naive means UTC)")
        parser.add_argument(
            "--completion-window",
            default="",
            help="batch completion window the key's tariffs are chosen by",
        )

    def run(self, **options: Any) -> dict[str, Any]:
        now = timezone.now()
        # Validated here too so the message names the option rather than the service field.
        if options["purpose"] not in ApiKey.Purpose.values:
            raise CommandError(
                f"invalid --purpose {options['purpose']!r}: "
                f"choose one of {', '.join(ApiKey.Purpose.values)}"
            )
        if options["scope"] not in ApiKey.Scope.values:
            raise CommandError(f"invalid --scope {options['scope']!r}: choose inference or admin")
        for name in ("rpm", "tpm"):
            if options[name] is not None and options[name] < 1:
                raise CommandError(f"invalid --{name} {options[name]}: must be 1 or more")
        budget = (
            None if options["budget"] is None else parse_amount(options["budget"], what="--budget")
        )
        period = options["budget_period"]
        if (budget is None) != (not period):
            raise CommandError("--budget and --budget-period go together")
        if period and period not in ApiKey.BudgetPeriod.values:
            raise CommandError(f"invalid --budget-period {period!r}: choose day, week or month")
        expires = (
            None if options["expires"] is None else parse_when(options["expires"], what="--expires")
        )
        issued = api_key_issue(
            account_id=options["account_id"],
            now=now,
            name=options["name"],
            purpose=options["purpose"],
            scope=options["scope"],
            completion_window=options["completion_window"],
            budget_limit=budget,
            budget_period=period,
            rpm=options["rpm"],
            tpm=options["tpm"],
            expires_at=expires,
        )
        key = issued.api_key
        return {
            "key_id": key.pk,
            "account_id": key.account_id,
            "api_key": issued.secret,
            "prefix": key.prefix,
            "name": key.name,
            "purpose": key.purpose,
            "scope": key.scope,
            "completion_window": key.completion_window,
            "budget": None if key.budget_limit is None else money_str(key.budget_limit),
            "budget_period": key.budget_period or None,
            "rpm": key.rpm,
            "tpm": key.tpm,
            "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        }

    def describe(self, result: dict[str, Any]) -> str:
        return (
            f"Issued key {result['key_id']} ({result['prefix']}…) for account "
            f"{result['account_id']}, purpose {result['purpose']}.\n"
            f"Secret (shown once, store it now): {result['api_key']}"
        )
