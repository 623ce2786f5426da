from typing import Any

from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import post_migrate

# SQLite rebuilds a table (DROP + CREATE) for many schema changes, which drops its triggers:
# they are re-created after every migrate. PostgreSQL alters tables in place (0002 suffices).
SQLITE_LEDGER_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS billing_{table}_no_{op.lower()} BEFORE {op} ON billing_{table} "
    f"BEGIN SELECT RAISE(ABORT, 'billing_{table} is append-only: {op} refused'); END;"
    for table in ("ledgerleg", "ledgertransaction")
    for op in ("UPDATE", "DELETE")
]


def _after_migrate(sender: AppConfig, using: str = "default", **kwargs: Any) -> None:
    from billing.services.ledger import account_ensure_system

    connection = connections[using]
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            for statement in SQLITE_LEDGER_TRIGGERS:
                cursor.execute(statement)
    account_ensure_system()


class BillingConfig(AppConfig):
    name = "billing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # post_migrate also runs after test flushes, so system accounts always exist.
        post_migrate.connect(_after_migrate, sender=self)
