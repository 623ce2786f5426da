"""The Finance group's permissions for payments: webhook events, checkouts, alert deliveries."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("reconciliation", "0005_queue_engine")]

    operations: list = []
