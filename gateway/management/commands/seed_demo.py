"""Seed a demo tenant against the mock upstream (used by bin/quickstart)."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand, parse_amount
from billing.models import Account, Tariff
from billing.services.accounts import account_create
from billing.services.keys import api_key_issue
from billing.services.tariffs import tariff_set
from gateway.services import model_route_set, upstream_add

DEMO_ACCOUNT = "Demo customer"


class Command(BillingCommand):
    help = "Create (or reuse) a demo account, upstreams, models and tariffs; issue a fresh key."

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--mock-url", default="http://127.0.0.1:9100")
        parser.add_argument("--credits", default="25")

    def run(self, **options: Any) -> dict[str, Any]:
        # Checked before anything is written: a bad amount changes nothing.
        credits = parse_amount(options["credits"], what="--credits")
        now = timezone.now()
        mock = options["mock_url"].rstrip("/")
        upstream_add(name="mock-openai", kind="openai", base_url=f"{mock}/v1")
        upstream_add(name="mock-anthropic", kind="anthropic", base_url=mock)
        for alias, upstream, prices in (
            ("gpt-demo", "mock-openai", ("2.50", "10.00", "1.25")),
            ("claude-demo", "mock-anthropic", ("3.00", "15.00", "0.30")),
        ):
            model_route_set(alias=alias, upstream_name=upstream, max_output_tokens=4096)
            if not Tariff.objects.filter(model__alias=alias).exists():
                tariff_set(
                    model_alias=alias,
                    input_per_mtok=Decimal(prices[0]),
                    output_per_mtok=Decimal(prices[1]),
                    cached_input_per_mtok=Decimal(prices[2]),
                    valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                )
        account = Account.objects.filter(name=DEMO_ACCOUNT, kind=Account.Kind.CUSTOMER).first()
        if account is None:
            account = account_create(name=DEMO_ACCOUNT, credits=credits, now=now)
        issued = api_key_issue(account_id=account.pk, name="quickstart", now=now)
        return {
            "account_id": account.pk,
            "api_key": issued.secret,
            "models": ["gpt-demo", "claude-demo"],
        }
