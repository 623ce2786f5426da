"""A reconciliation item's account is not checked by a foreign-key constraint (see the model):
the sweep's per-row check was an eighth of its server time."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("reconciliation", "0007_back_office"),
        ("billing", "0013_engine_0002"),
    ]

    operations = [
        migrations.AlterField(
            model_name="reconciliationitem",
            name="account",
            field=models.ForeignKey(
                blank=True,
                db_constraint=False,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="reconciliation_items",
                to="billing.account",
            ),
        ),
    ]
