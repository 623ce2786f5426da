from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _after_migrate(sender: AppConfig, using: str = "default", **kwargs: Any) -> None:
    from billing.services.ledger import account_ensure_system

    # After migrate, the models as the schema now is: migrated back, the table lacks columns
    # the code's model has (a test flush passes no state: the code's model is the schema's).
    state = kwargs.get("apps")
    account_ensure_system(account_model=state.get_model("billing", "Account") if state else None)


class BillingConfig(AppConfig):
    name = "billing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # post_migrate also runs after test flushes, so system accounts always exist.
        post_migrate.connect(_after_migrate, sender=self)
