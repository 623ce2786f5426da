# An expired-hold sweep writes one item per hold, and pays for every index there: the
# request_id index (and its LIKE twin) duplicated the unique (kind, request_id) one, and
# resolved_by and transaction are empty until an item is resolved.
#
# Only the indexes change in the database. Django's own AlterField would also drop and re-add
# both foreign keys, re-checking every item under a lock that stops the sweep and the
# settlement hand-offs writing items meanwhile.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

TABLE = "reconciliation_reconciliationitem"
REQUEST_ID_INDEX = f"{TABLE}_request_id_0f53390e"
RESOLVED_BY_INDEX = f"{TABLE}_resolved_by_id_51d78585"
TRANSACTION_INDEX = f"{TABLE}_transaction_id_467d3f0d"


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0005_fewer_index_writes"),
        ("reconciliation", "0003_default_beat_schedules"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    sql=[
                        f"DROP INDEX IF EXISTS {REQUEST_ID_INDEX}",
                        f"DROP INDEX IF EXISTS {REQUEST_ID_INDEX}_like",  # PostgreSQL only
                        f"DROP INDEX IF EXISTS {RESOLVED_BY_INDEX}",
                        f"DROP INDEX IF EXISTS {TRANSACTION_INDEX}",
                        f"CREATE INDEX item_resolved_by ON {TABLE} (resolved_by_id) "
                        "WHERE resolved_by_id IS NOT NULL",
                        f"CREATE INDEX item_transaction ON {TABLE} (transaction_id) "
                        "WHERE transaction_id IS NOT NULL",
                    ],
                    reverse_sql=[
                        "DROP INDEX IF EXISTS item_resolved_by",
                        "DROP INDEX IF EXISTS item_transaction",
                        f"CREATE INDEX {REQUEST_ID_INDEX} ON {TABLE} (request_id)",
                        f"CREATE INDEX {RESOLVED_BY_INDEX} ON {TABLE} (resolved_by_id)",
                        f"CREATE INDEX {TRANSACTION_INDEX} ON {TABLE} (transaction_id)",
                    ],
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="reconciliationitem",
                    name="request_id",
                    field=models.CharField(blank=True, default="", max_length=64),
                ),
                migrations.AlterField(
                    model_name="reconciliationitem",
                    name="resolved_by",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                migrations.AlterField(
                    model_name="reconciliationitem",
                    name="transaction",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="billing.ledgertransaction",
                    ),
                ),
                migrations.AddIndex(
                    model_name="reconciliationitem",
                    index=models.Index(
                        condition=models.Q(("resolved_by__isnull", False)),
                        fields=["resolved_by"],
                        name="item_resolved_by",
                    ),
                ),
                migrations.AddIndex(
                    model_name="reconciliationitem",
                    index=models.Index(
                        condition=models.Q(("transaction__isnull", False)),
                        fields=["transaction"],
                        name="item_transaction",
                    ),
                ),
            ],
        ),
    ]
