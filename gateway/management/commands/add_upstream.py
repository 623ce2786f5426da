from typing import Any

from django.core.management.base import CommandParser

from billing.management.base import BillingCommand
from gateway.services import upstream_add


class Command(BillingCommand):
    help = "Create or update an upstream provider."

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("name")
        parser.add_argument("--kind", required=True, choices=["openai", "anthropic"])
        parser.add_argument(
            "--base-url", required=True, help="openai: including /v1; anthropic: without /v1"
        )
        parser.add_argument(
            "--api-key-env", default="", help="environment variable holding the upstream credential"
        )

    def run(self, **options: Any) -> dict[str, Any]:
        upstream = upstream_add(
            name=options["name"],
            kind=options["kind"],
            base_url=options["base_url"],
            api_key_env=options["api_key_env"],
        )
        return {
            "upstream_id": upstream.pk,
            "name": upstream.name,
            "kind": upstream.kind,
            "base_url": upstream.base_url,
        }
