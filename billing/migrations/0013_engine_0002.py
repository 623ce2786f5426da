"""Install the money engine, version 2 (billing/sql/engine_0002.sql), over version 1; going
back runs version 1's file again. (The reconciliation queue's functions call the engine's by
name, late-bound: replacing the billing_engine schema leaves them in place.)"""

from django.db import migrations

from billing.engine import engine_sql


def forward(apps, schema_editor):
    schema_editor.execute(engine_sql("engine_0002.sql"), params=None)


def reverse(apps, schema_editor):
    schema_editor.execute(engine_sql("engine_0001.sql"), params=None)


class Migration(migrations.Migration):
    dependencies = [("billing", "0012_back_office")]

    operations = [migrations.RunPython(forward, reverse)]
