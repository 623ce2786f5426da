"""Adjustments get their own permission (granted by a superuser or a finance lead, not by the
Finance group); grants, purchases and refunds keep needing post_adjustment."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("billing", "0007_transaction_needs_legs")]

    operations = [
        migrations.AlterModelOptions(
            name="account",
            options={
                "permissions": [
                    ("post_adjustment", "Can post grants, purchases, refunds, adjustments"),
                    ("post_balance_adjustment", "Can post balance adjustments"),
                ]
            },
        ),
    ]
