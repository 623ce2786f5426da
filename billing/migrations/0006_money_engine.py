"""Install the money engine, version 1 (billing/sql/engine_0001.sql): one PL/pgSQL function per
money operation, in the billing_engine schema, with the hold's checkpoint columns it uses. A
later version ships its own file and a migration that runs it, going back by running this
one."""

from django.db import migrations, models

import billing.money

from billing.engine import engine_sql


def forward(apps, schema_editor):
    schema_editor.execute(engine_sql("engine_0001.sql"), params=None)


def reverse(apps, schema_editor):
    schema_editor.execute("DROP SCHEMA IF EXISTS billing_engine CASCADE", params=None)


class Migration(migrations.Migration):
    dependencies = [("billing", "0005_fewer_index_writes")]

    operations = [
        migrations.AddField(
            model_name="hold",
            name="checkpoint_cost",
            field=billing.money.MoneyField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="hold",
            name="checkpoint_usage",
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="hold",
            name="checkpoint_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(forward, reverse),
    ]
