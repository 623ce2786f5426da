from typing import Any

from django.core.management.base import CommandParser

from billing.management.base import BillingCommand
from gateway.services import model_route_set


class Command(BillingCommand):
    help = "Route a model alias to an upstream."

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("alias")
        parser.add_argument("--upstream", required=True)
        parser.add_argument("--upstream-model", default="")
        parser.add_argument("--max-output-tokens", type=int, default=4096)

    def run(self, **options: Any) -> dict[str, Any]:
        route = model_route_set(
            alias=options["alias"],
            upstream_name=options["upstream"],
            upstream_model=options["upstream_model"],
            max_output_tokens=options["max_output_tokens"],
        )
        return {
            "route_id": route.pk,
            "model": route.model.alias,
            "upstream": route.upstream.name,
            "upstream_model": route.upstream_model,
            "max_output_tokens": route.max_output_tokens,
        }
