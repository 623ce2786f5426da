"""The operator commands are a contract: names, arguments, one JSON line on stdout with --json,
one line on stderr and a non-zero exit for bad arguments, and no change when refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.utils import timezone

from billing.models import (
    SYSTEM_ACCOUNT_IDS,
    Account,
    ApiKey,
    Hold,
    LanguageModel,
    LedgerLeg,
    LedgerTransaction,
    Tariff,
)
from billing.selectors import tariff_select
from billing.services.keys import api_key_hash
from tests.factories import make_account

ROOT = Path(__file__).resolve().parents[2]
D = Decimal


def run_json(*args: str) -> dict[str, Any]:
    """call_command with --json; asserts stdout is exactly one JSON line."""
    out = StringIO()
    call_command(*args, "--json", stdout=out, stderr=StringIO())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, out.getvalue()
    return json.loads(lines[0])


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it, against the test database."""
    db = connection.settings_dict
    credentials = db["USER"] + (f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else "")
    env = dict(os.environ)
    env["DATABASE_URL"] = (
        f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    )
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def manage_json(*args: str) -> dict[str, Any]:
    result = manage(*args, "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert "Traceback" not in result.stderr
    return json.loads(lines[0])


def table_counts() -> dict[str, int]:
    models = [Account, ApiKey, LanguageModel, Tariff, LedgerTransaction, LedgerLeg, Hold]
    return {model.__name__: model._default_manager.count() for model in models}


# --- call_command: each command's JSON contract --------------------------------------------

pytestmark = pytest.mark.django_db


def test_create_account_reports_id_and_balance() -> None:
    data = run_json("create_account", "Acme", "--credits", "12.5", "--overdraft", "2")
    account = Account.objects.get(pk=data["account_id"])
    assert data["balance"] == "12.5000000000"
    assert (account.name, account.balance, account.overdraft) == ("Acme", D("12.5"), D(2))


def test_create_account_defaults_to_zero_credits() -> None:
    data = run_json("create_account", "Empty")
    assert data["balance"] == "0.0000000000"
    assert not LedgerLeg.objects.filter(account_id=data["account_id"]).exists()


def test_issue_api_key_shows_the_secret_once_and_stores_only_its_hash() -> None:
    account = make_account()
    data = run_json(
        "issue_api_key",
        str(account.pk),
        "--name",
        "ci",
        "--purpose",
        "batch",
        "--completion-window",
        "24h",
        "--budget",
        "5",
        "--budget-period",
        "week",
        "--expires",
        "2099-01-01T00:00:00",
    )
    key = ApiKey.objects.get(pk=data["key_id"])
    assert data["api_key"].startswith(data["prefix"]) and key.prefix == data["prefix"]
    assert key.secret_hash == api_key_hash(data["api_key"])
    assert data["api_key"] not in key.secret_hash
    assert (key.purpose, key.completion_window, key.budget_limit, key.budget_period) == (
        "batch",
        "24h",
        D(5),
        "week",
    )
    assert key.expires_at == datetime(2099, 1, 1, tzinfo=UTC)  # naive means UTC


def test_issue_api_key_defaults_to_realtime_without_budget() -> None:
    data = run_json("issue_api_key", str(make_account().pk))
    key = ApiKey.objects.get(pk=data["key_id"])
    assert (key.purpose, key.budget_limit, key.expires_at) == ("realtime", None, None)


def test_revoke_api_key_reports_status_and_time() -> None:
    key_id = run_json("issue_api_key", str(make_account().pk))["key_id"]
    data = run_json("revoke_api_key", str(key_id))
    assert (data["key_id"], data["status"]) == (key_id, "revoked")
    assert datetime.fromisoformat(data["revoked_at"]) == ApiKey.objects.get(pk=key_id).revoked_at


def test_set_tariff_creates_the_model_and_a_selectable_tariff() -> None:
    before = timezone.now()
    data = run_json(
        "set_tariff",
        "gpt-cmd",
        "--input-per-mtok",
        "2.5",
        "--output-per-mtok",
        "10",
        "--cached-input-per-mtok",
        "1.25",
        "--cache-write-per-mtok",
        "3.125",
        "--reasoning-per-mtok",
        "12",
    )
    tariff = Tariff.objects.get(pk=data["tariff_id"])
    assert tariff.model.alias == "gpt-cmd"
    assert tariff.valid_from >= before  # defaults to now
    assert (
        tariff.cached_input_per_mtok,
        tariff.cache_write_per_mtok,
        tariff.reasoning_per_mtok,
    ) == (
        D("1.25"),
        D("3.125"),
        D(12),
    )
    chosen = tariff_select(
        model_alias="gpt-cmd",
        purpose="realtime",
        completion_window="",
        at=timezone.now() + timedelta(seconds=1),
    )
    assert chosen is not None and chosen.pk == tariff.pk


def test_set_tariff_with_window_purpose_and_validity() -> None:
    run_json("set_tariff", "gpt-cmd", "--input-per-mtok", "1", "--output-per-mtok", "1")
    data = run_json(
        "set_tariff",
        "gpt-cmd",
        "--input-per-mtok",
        "0.5",
        "--output-per-mtok",
        "2",
        "--purpose",
        "batch",
        "--completion-window",
        "24h",
        "--valid-from",
        "2026-01-01",
        "--valid-until",
        "2027-01-01T00:00:00+00:00",
    )
    tariff = Tariff.objects.get(pk=data["tariff_id"])
    assert (tariff.purpose, tariff.completion_window) == ("batch", "24h")
    assert tariff.valid_from == datetime(2026, 1, 1, tzinfo=UTC)
    assert tariff.valid_until == datetime(2027, 1, 1, tzinfo=UTC)
    assert LanguageModel.objects.filter(alias="gpt-cmd").count() == 1  # reused, not duplicated


def test_grant_credits_reports_transaction_and_new_balance() -> None:
    account = make_account(credits=D("1"))
    data = run_json("grant_credits", str(account.pk), "2.0000000001", "--memo", "goodwill")
    txn = LedgerTransaction.objects.get(pk=data["transaction_id"])
    assert data["balance"] == "3.0000000001"
    assert (txn.kind, txn.memo) == ("grant", "goodwill")
    assert txn.legs.get(account_id=SYSTEM_ACCOUNT_IDS["promotions"]).amount == D("-2.0000000001")


def test_grant_credits_purchase_comes_from_payments() -> None:
    account = make_account(credits=D("0"))
    data = run_json(
        "grant_credits", str(account.pk), "5", "--memo", "invoice 7", "--kind", "purchase"
    )
    txn = LedgerTransaction.objects.get(pk=data["transaction_id"])
    assert txn.kind == "purchase"
    assert txn.legs.get(account_id=SYSTEM_ACCOUNT_IDS["payments"]).amount == D(-5)


def test_grant_credits_with_same_idempotency_key_posts_once() -> None:
    account = make_account(credits=D("0"))
    args = (
        "grant_credits",
        str(account.pk),
        "4",
        "--memo",
        "promo",
        "--idempotency-key",
        "promo-1",
    )
    first = run_json(*args)
    again = run_json(*args)
    assert again["transaction_id"] == first["transaction_id"]
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert again["balance"] == "4.0000000000"
    assert LedgerTransaction.objects.filter(idempotency_key="promo-1").count() == 1


def test_grant_credits_without_key_posts_each_invocation() -> None:
    account = make_account(credits=D("0"))
    first = run_json("grant_credits", str(account.pk), "1", "--memo", "a")
    second = run_json("grant_credits", str(account.pk), "1", "--memo", "a")
    assert first["transaction_id"] != second["transaction_id"]
    assert second["balance"] == "2.0000000000"


def test_grant_credits_reused_key_with_other_amount_is_refused() -> None:
    account = make_account(credits=D("0"))
    run_json("grant_credits", str(account.pk), "1", "--memo", "a", "--idempotency-key", "k")
    with pytest.raises(CommandError, match="different posting"):
        run_json("grant_credits", str(account.pk), "2", "--memo", "a", "--idempotency-key", "k")
    account.refresh_from_db()
    assert account.balance == D(1)


def test_account_statement_shows_balances_and_entries_newest_first() -> None:
    account = make_account(credits=D("10"), overdraft=D("1"))
    run_json("grant_credits", str(account.pk), "0.25", "--memo", "second")
    data = run_json("account_statement", str(account.pk))
    assert {
        key: data[key]
        for key in ("account_id", "currency", "balance", "held", "available", "overdraft")
    } == {
        "account_id": account.pk,
        "currency": "USD",
        "balance": "10.2500000000",
        "held": "0.0000000000",
        "available": "10.2500000000",
        "overdraft": "1.0000000000",
    }
    assert [(entry["memo"], entry["amount"]) for entry in data["entries"]] == [
        ("second", "0.2500000000"),
        ("opening credits", "10.0000000000"),
    ]


def test_account_statement_limit() -> None:
    account = make_account(credits=D("1"))
    run_json("grant_credits", str(account.pk), "1", "--memo", "newest")
    data = run_json("account_statement", str(account.pk), "--limit", "1")
    assert [entry["memo"] for entry in data["entries"]] == ["newest"]


def test_audit_ledger_on_a_clean_ledger() -> None:
    make_account(credits=D("3"))
    data = run_json("audit_ledger")
    assert data["accounts_checked"] >= 1
    assert (data["mismatches"], data["unbalanced_transactions"]) == ([], [])


def test_human_output_is_not_json() -> None:
    out = StringIO()
    call_command("create_account", "Plain", "--credits", "1", stdout=out)
    assert not out.getvalue().startswith("{")
    assert "1.0000000000" in out.getvalue()


# --- bad arguments ---------------------------------------------------------------------------

# "{account}" is replaced by a real customer account id.
BAD_ARGUMENTS = [
    pytest.param(["create_account", "X", "--credits", "ten"], id="malformed-amount"),
    pytest.param(["create_account", "X", "--credits", "-5"], id="negative-amount"),
    pytest.param(["create_account", "X", "--overdraft", "-0.01"], id="negative-overdraft"),
    pytest.param(["create_account", "X", "--credits", "1.00000000001"], id="eleven-decimal-places"),
    pytest.param(["create_account", "X", "--credits", "1e30"], id="amount-out-of-range"),
    pytest.param(["create_account", "X", "--credits", "NaN"], id="nan-amount"),
    pytest.param(["create_account", "   "], id="blank-name"),
    pytest.param(
        ["grant_credits", "{account}", "1.5.5", "--memo", "m"], id="grant-malformed-amount"
    ),
    pytest.param(["grant_credits", "{account}", "-1", "--memo", "m"], id="grant-negative-amount"),
    pytest.param(["grant_credits", "{account}", "0", "--memo", "m"], id="grant-zero-amount"),
    pytest.param(
        ["grant_credits", "{account}", "0.00000000001", "--memo", "m"], id="grant-eleven-places"
    ),
    pytest.param(["grant_credits", "999999", "1", "--memo", "m"], id="grant-unknown-account"),
    pytest.param(["grant_credits", "-1", "1", "--memo", "m"], id="grant-to-system-account"),
    pytest.param(["grant_credits", "{account}", "1"], id="grant-without-memo"),
    pytest.param(["grant_credits", "{account}", "1", "--memo", " "], id="grant-blank-memo"),
    pytest.param(
        ["grant_credits", "{account}", "1", "--memo", "m", "--kind", "refund"], id="grant-bad-kind"
    ),
    pytest.param(["issue_api_key", "999999"], id="key-unknown-account"),
    pytest.param(["issue_api_key", "abc"], id="key-non-numeric-account"),
    pytest.param(["issue_api_key", "{account}", "--expires", "next tuesday"], id="bad-iso-date"),
    pytest.param(
        ["issue_api_key", "{account}", "--expires", "2001-01-01"], id="expiry-in-the-past"
    ),
    pytest.param(["issue_api_key", "{account}", "--purpose", "wizardry"], id="unknown-purpose"),
    pytest.param(["issue_api_key", "{account}", "--budget", "5"], id="budget-without-period"),
    pytest.param(
        ["issue_api_key", "{account}", "--budget-period", "day"], id="period-without-budget"
    ),
    pytest.param(
        ["issue_api_key", "{account}", "--budget", "5", "--budget-period", "year"],
        id="unknown-budget-period",
    ),
    pytest.param(
        ["issue_api_key", "{account}", "--budget", "-5", "--budget-period", "day"],
        id="negative-budget",
    ),
    pytest.param(["revoke_api_key", "999999"], id="revoke-unknown-key"),
    pytest.param(
        ["set_tariff", "m", "--input-per-mtok", "x", "--output-per-mtok", "1"],
        id="tariff-malformed-price",
    ),
    pytest.param(
        ["set_tariff", "m", "--input-per-mtok", "-1", "--output-per-mtok", "1"],
        id="tariff-negative-price",
    ),
    pytest.param(["set_tariff", "m", "--input-per-mtok", "1"], id="tariff-missing-output-price"),
    pytest.param(
        [
            "set_tariff",
            "m",
            "--input-per-mtok",
            "1",
            "--output-per-mtok",
            "1",
            "--purpose",
            "wizardry",
        ],
        id="tariff-unknown-purpose",
    ),
    pytest.param(
        [
            "set_tariff",
            "m",
            "--input-per-mtok",
            "1",
            "--output-per-mtok",
            "1",
            "--valid-from",
            "2026-02-30",
        ],
        id="tariff-bad-date",
    ),
    pytest.param(
        [
            "set_tariff",
            "m",
            "--input-per-mtok",
            "1",
            "--output-per-mtok",
            "1",
            "--valid-from",
            "2026-01-02",
            "--valid-until",
            "2026-01-01",
        ],
        id="tariff-validity-reversed",
    ),
    pytest.param(["account_statement", "999999"], id="statement-unknown-account"),
    pytest.param(["account_statement", "{account}", "--limit", "0"], id="statement-zero-limit"),
]


def fill(args: list[str], account: Account) -> list[str]:
    return [str(account.pk) if arg == "{account}" else arg for arg in args]


@pytest.mark.parametrize("args", BAD_ARGUMENTS)
def test_bad_arguments_raise_command_error_and_change_nothing(args: list[str]) -> None:
    account = make_account(credits=D("1"))
    before = table_counts()
    with pytest.raises(CommandError) as caught:
        call_command(*fill(args, account), "--json", stdout=StringIO(), stderr=StringIO())
    assert "\n" not in str(caught.value)
    assert table_counts() == before
    account.refresh_from_db()
    assert account.balance == D(1)


@pytest.mark.parametrize("account_id", [*SYSTEM_ACCOUNT_IDS.values(), 999999])
@pytest.mark.parametrize("kind", ["grant", "purchase"])
def test_a_grant_names_the_missing_customer_account(account_id: int, kind: str) -> None:
    # The engine checks each leg's account kind, not which leg is the customer's: a grant to a
    # system account would be a valid system-to-system posting unless the service refuses it.
    make_account(credits=D("1"))
    before = table_counts()
    with pytest.raises(CommandError, match=rf"^no customer account {account_id}$"):
        call_command(
            "grant_credits", str(account_id), "1", "--memo", "m", "--kind", kind,
            stdout=StringIO(), stderr=StringIO(),
        )
    assert table_counts() == before


# --- the real thing: subprocesses against the test database -----------------------------------

SUBPROCESS_BAD_ARGUMENTS = [
    pytest.param(["create_account", "X", "--credits", "ten"], id="malformed-amount"),
    pytest.param(["grant_credits", "{account}", "-1", "--memo", "m"], id="negative-amount"),
    pytest.param(
        ["grant_credits", "{account}", "0.00000000001", "--memo", "m"], id="eleven-decimal-places"
    ),
    pytest.param(["grant_credits", "999999", "1", "--memo", "m"], id="unknown-account-id"),
    pytest.param(["issue_api_key", "{account}", "--expires", "2026-13-45"], id="bad-iso-date"),
    pytest.param(
        [
            "set_tariff",
            "m",
            "--input-per-mtok",
            "1",
            "--output-per-mtok",
            "1",
            "--purpose",
            "wizardry",
        ],
        id="unknown-purpose",
    ),
    pytest.param(["issue_api_key", "{account}", "--budget", "5"], id="budget-without-period"),
    pytest.param(["issue_api_key", "not-a-number"], id="argparse-type-error"),
    pytest.param(["grant_credits", "{account}", "1"], id="argparse-missing-option"),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("args", SUBPROCESS_BAD_ARGUMENTS)
def test_bad_arguments_in_a_real_process_fail_in_one_line(args: list[str]) -> None:
    account = make_account(credits=D("1"))
    before = table_counts()
    result = manage(*fill(args, account), "--json")
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert table_counts() == before


@pytest.mark.django_db(transaction=True)
def test_operator_workflow_in_real_processes() -> None:
    # set_tariff and revoke_api_key share the same base; call_command covers them above.
    created = manage_json("create_account", "Process Co", "--credits", "3")
    account_id = str(created["account_id"])
    assert created["balance"] == "3.0000000000"

    key = manage_json("issue_api_key", account_id, "--name", "script")
    assert ApiKey.objects.get(pk=key["key_id"]).secret_hash == api_key_hash(key["api_key"])

    idempotency_key = f"ops-{uuid.uuid4()}"
    granted = manage_json(
        "grant_credits", account_id, "1.5", "--memo", "top-up", "--idempotency-key", idempotency_key
    )
    replayed = manage_json(
        "grant_credits", account_id, "1.5", "--memo", "top-up", "--idempotency-key", idempotency_key
    )
    assert replayed["transaction_id"] == granted["transaction_id"]
    assert replayed["balance"] == granted["balance"] == "4.5000000000"

    statement = manage_json("account_statement", account_id)
    assert (statement["balance"], statement["held"], statement["available"]) == (
        "4.5000000000",
        "0.0000000000",
        "4.5000000000",
    )
    newest = statement["entries"][0]
    assert newest["transaction_id"] == granted["transaction_id"]

    audit = manage_json("audit_ledger")
    assert audit["accounts_checked"] == 1 and audit["mismatches"] == []


@pytest.mark.django_db(transaction=True)
def test_audit_ledger_exits_non_zero_on_a_mismatch_and_still_prints_the_report() -> None:
    account = make_account(credits=D("2"))
    # A balanced posting written around the services leaves the cached balance behind.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO billing_ledgertransaction
                   (kind, idempotency_key, content_hash, request_id, memo, occurred_at, posted_at,
                    model_alias, is_overrun, is_late)
               VALUES ('adjustment', %s, '', '', 'raw', now(), now(), '', false, false)
               RETURNING id""",
            [f"raw-{uuid.uuid4()}"],
        )
        txn_id = cursor.fetchone()[0]
        cursor.execute(
            "INSERT INTO billing_ledgerleg (transaction_id, account_id, amount)"
            " VALUES (%s, %s, %s), (%s, %s, %s)",
            [txn_id, account.pk, 10**10, txn_id, SYSTEM_ACCOUNT_IDS["promotions"], -(10**10)],
        )

    result = manage("audit_ledger", "--json")

    assert result.returncode != 0
    [line] = result.stdout.splitlines()
    report = json.loads(line)
    assert [row["account_id"] for row in report["mismatches"]] == [account.pk]
    assert report["mismatches"][0]["ledger_balance"] == "3.0000000000"
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(CommandError):
        call_command("audit_ledger", stdout=StringIO())
