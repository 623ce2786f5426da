"""Payments: providers' customers, checkouts, stored webhook events, auto top-up, balance alerts and their outbox."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("billing", "0009_api_key_scope_and_rate_limits")]

    operations: list = []
