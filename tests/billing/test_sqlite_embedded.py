"""The embedded default (SQLite) keeps the ledger append-only after every migration, even the
ones SQLite applies by rebuilding tables (which drops their triggers)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    var_dir = tmp_path_factory.mktemp("sqlite-var")
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env |= {"BILLING_VAR_DIR": str(var_dir), "DJANGO_SETTINGS_MODULE": "config.settings"}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    return var_dir / "billing.sqlite3"


@pytest.mark.parametrize("table", ["billing_ledgerleg", "billing_ledgertransaction"])
@pytest.mark.parametrize("statement", ["UPDATE {table} SET id = id", "DELETE FROM {table}"])
def test_ledger_tables_refuse_updates_and_deletes_after_all_migrations(
    migrated_sqlite, table, statement
):
    with sqlite3.connect(migrated_sqlite) as db:
        db.execute(
            "INSERT INTO billing_ledgertransaction (kind, idempotency_key, content_hash, "
            "request_id, memo, occurred_at, posted_at, model_alias, is_overrun, is_late) "
            "VALUES ('grant', ?, 'x', '', '', '2026-01-01', '2026-01-01', '', 0, 0)",
            [f"k-{table}-{statement[:6]}"],
        )
        txn_id = db.execute("SELECT max(id) FROM billing_ledgertransaction").fetchone()[0]
        db.executemany(
            "INSERT INTO billing_ledgerleg (transaction_id, account_id, amount) VALUES (?, ?, ?)",
            [(txn_id, -1, 5), (txn_id, -2, -5)],
        )
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(statement.format(table=table))
