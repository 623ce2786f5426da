from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _ensure_finance_group(sender: AppConfig, **kwargs: Any) -> None:
    from reconciliation.services.finance import finance_group_ensure

    finance_group_ensure()


class ReconciliationConfig(AppConfig):
    name = "reconciliation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # A test flush deletes groups; recreate Finance after it, as billing does its accounts.
        post_migrate.connect(_ensure_finance_group, sender=self)
