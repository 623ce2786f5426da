"""The finance back office's onboarding in the admin."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("billing", "0011_provider_prices_and_account_tariffs")]

    operations: list = []
