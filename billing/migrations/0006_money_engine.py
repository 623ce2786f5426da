"""Install the money engine, version 1 (billing/sql/engine_0001.sql): one PL/pgSQL function per
money operation, in the billing_engine schema. A later version ships its own file and a
migration that runs it, going back by running this one."""

from django.db import migrations

from billing.engine import engine_sql


def forward(apps, schema_editor):
    schema_editor.execute(engine_sql("engine_0001.sql"), params=None)


def reverse(apps, schema_editor):
    schema_editor.execute("DROP SCHEMA IF EXISTS billing_engine CASCADE", params=None)


class Migration(migrations.Migration):
    dependencies = [("billing", "0005_fewer_index_writes")]

    operations = [migrations.RunPython(forward, reverse)]
