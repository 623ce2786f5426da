from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand
from billing.services.keys import api_key_revoke


class Command(BillingCommand):
    help = "Revoke an API key. Revoking an already revoked key changes nothing."

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("key_id", type=int)

    def run(self, **options: Any) -> dict[str, Any]:
        key = api_key_revoke(key_id=options["key_id"], now=timezone.now())
        return {
            "key_id": key.pk,
            "prefix": key.prefix,
            "status": key.status,
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        }

    def describe(self, result: dict[str, Any]) -> str:
        return (
            f"Key {result['key_id']} ({result['prefix']}…) is {result['status']} "
            f"since {result['revoked_at']}"
        )
