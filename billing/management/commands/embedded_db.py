from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, CommandParser

from billing.management.base import BillingCommand
from config import embedded_db
from config.database import EMBEDDED_DATABASE


class Command(BillingCommand):
    help = (
        "The embedded PostgreSQL server under VAR_DIR (the database when DATABASE_URL is unset): "
        "status, start (and create the billing database), or stop. This command never starts "
        "it by itself loading the settings."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("action", choices=["status", "start", "stop"])

    def run(self, **options: Any) -> dict[str, Any]:
        var_dir = settings.VAR_DIR
        action = options["action"]
        changed = False
        try:
            if action == "start":
                changed = not embedded_db.status(var_dir, EMBEDDED_DATABASE).running
                embedded_db.ensure_running(var_dir, EMBEDDED_DATABASE)
            elif action == "stop":
                changed = embedded_db.stop(var_dir)
        except embedded_db.EmbeddedDatabaseError as exc:
            raise CommandError(str(exc)) from exc
        result = embedded_db.status(var_dir, EMBEDDED_DATABASE).as_json()
        if action != "status":
            result[{"start": "started", "stop": "stopped"}[action]] = changed
        return result

    def describe(self, result: dict[str, Any]) -> str:
        if not result["running"]:
            state = "stopped" if result.get("stopped") else "not running"
            return f"Embedded PostgreSQL ({result['data_dir']}): {state}."
        started = " (started now)" if result.get("started") else ""
        return (
            f"Embedded PostgreSQL ({result['data_dir']}): running{started}, pid {result['pid']}, "
            f"{result['url']}"
        )
