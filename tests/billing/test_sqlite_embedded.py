"""The embedded default (SQLite) keeps the ledger append-only after every migration, even the
ones SQLite applies by rebuilding tables (which drops their triggers)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sqlite_migrated(var_dir: Path) -> dict[str, str]:
    """Migrate the embedded SQLite database under `var_dir`; the environment that uses it."""
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env |= {"BILLING_VAR_DIR": str(var_dir), "DJANGO_SETTINGS_MODULE": "config.settings"}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    return env


@pytest.fixture(scope="module")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    var_dir = tmp_path_factory.mktemp("sqlite-var")
    _sqlite_migrated(var_dir)
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


SQLITE_MONEY_PATHS = """
import json, uuid
from datetime import timedelta
from decimal import Decimal as D
from django.utils import timezone
from billing.errors import InsufficientFunds
from billing.models import ApiKey, Hold
from billing.money import money_str
from billing.selectors import ledger_audit
from billing.services.accounts import account_create
from billing.services.holds import hold_place, hold_release, hold_settle, holds_expire
from billing.services.keys import api_key_issue

now = timezone.now()
account = account_create(name="embedded", credits=D("1"), now=now)
key = api_key_issue(account_id=account.pk, now=now).api_key
budgeted = api_key_issue(account_id=account.pk, now=now, budget_limit=D("0.5"),
                         budget_period="day").api_key
ids = ["req_" + uuid.uuid4().hex for _ in range(5)]
hold_place(api_key=key, request_id=ids[0], amount=D("0.3"), now=now)
hold_settle(request_id=ids[0], cost=D("0.1234567891"), now=now)
hold_place(api_key=key, request_id=ids[1], amount=D("0.3"), now=now)
hold_release(request_id=ids[1], now=now)
for request_id in ids[2:4]:
    hold_place(api_key=budgeted, request_id=request_id, amount=D("0.2"), now=now)
refused = False
try:
    hold_place(api_key=key, request_id=ids[4], amount=D("0.7"), now=now)
except InsufficientFunds:
    refused = True
expired = holds_expire(now=now + timedelta(hours=1), batch_size=1)
account.refresh_from_db()
print(json.dumps({
    "balance": money_str(account.balance), "held": money_str(account.held), "refused": refused,
    "expired": expired,
    "budget_held": money_str(ApiKey.objects.get(pk=budgeted.pk).budget_held),
    "states": sorted(Hold.objects.values_list("state", flat=True)),
    "audit_clean": ledger_audit().clean,
}))
"""


def test_holds_settle_release_and_expire_on_the_embedded_sqlite_database(tmp_path):
    """The ORM paths (SQLite has no single-statement hold or sweep) keep every invariant."""
    env = _sqlite_migrated(tmp_path)
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", SQLITE_MONEY_PATHS],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {
        "balance": "0.8765432109",
        "held": "0.0000000000",
        "refused": True,  # 0.7 > 1 - 0.1234567891 - 0.4 held by the budgeted key
        "expired": 2,
        "budget_held": "0.0000000000",
        "states": ["expired", "expired", "released", "settled"],
        "audit_clean": True,
    }
