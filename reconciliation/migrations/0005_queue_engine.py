"""Install the reconciliation queue's engine functions, version 1
(reconciliation/sql/queue_0001.sql): the sweep's expiry and queueing in one statement."""

from pathlib import Path

from django.db import migrations

SQL = Path(__file__).resolve().parent.parent / "sql" / "queue_0001.sql"


def forward(apps, schema_editor):
    schema_editor.execute(SQL.read_text(), params=None)


def reverse(apps, schema_editor):
    schema_editor.execute("DROP SCHEMA IF EXISTS reconciliation_engine CASCADE", params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("reconciliation", "0004_item_indexes_for_the_sweep"),
        ("billing", "0006_money_engine"),
    ]

    operations = [migrations.RunPython(forward, reverse)]
