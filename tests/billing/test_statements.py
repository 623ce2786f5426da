"""Monthly statements: figures that reconcile exactly to the ledger (late usage included), the
command, the PDF (rendered, read back, turned into PNG pages), the API with the account's own
admin-scope key over real HTTP, issuing by the Celery task on a real worker, and the admin."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, date, datetime
from decimal import Decimal
from io import StringIO
from pathlib import Path

import httpx
import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django_celery_beat.models import PeriodicTask

from billing.models import Account, ApiKey, Hold, Statement
from billing.pricing import Usage
from billing.selectors import ledger_audit
from billing.services.accounts import credit_post
from billing.services.holds import RequestDetails, hold_place, hold_settle, request_write_off_post
from billing.services.statements import statement_issue, statements_issue_for_month
from billing.statements import statement_figures_get
from reconciliation.tasks import statements_issue
from tests.factories import make_account, make_key
from tests.gateway.conftest import live_gateway, mock_upstream
from tests.workers import wait_until

__all__ = ["live_gateway", "mock_upstream"]

D = Decimal
NOV = date(2026, 11, 1)
DEC = date(2026, 12, 1)


def t(month: int, day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


def _ledger_total(account_id: int, *, before: datetime) -> Decimal:
    """The account's legs posted before `before`, summed by SQL, around the ORM."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT COALESCE(SUM(l.amount), 0) FROM billing_ledgerleg l "
            "JOIN billing_ledgertransaction t ON t.id = l.transaction_id "
            "WHERE l.account_id = %s AND t.posted_at < %s",
            [account_id, before],
        )
        [(units,)] = cursor.fetchall()
    return D(units).scaleb(-10)


def _request(
    key: ApiKey,
    request_id: str,
    *,
    model: str,
    cost: str,
    placed: datetime,
    settled: datetime,
    usage: Usage,
) -> None:
    hold_place(api_key=key, request_id=request_id, amount=D("2"), now=placed, model_alias=model)
    hold_settle(
        request_id=request_id,
        cost=D(cost),
        now=settled,
        usage=usage,
        details=RequestDetails(
            endpoint="chat.completions",
            started_at=placed,
            outcome="completed",
            provider_cost=D("0.01"),
        ),
    )


def _credit(account: Account, kind: str, amount: str, when: datetime) -> None:
    credit_post(
        kind=kind,
        account_id=account.pk,
        amount=D(amount),
        memo=f"{kind} {amount}",
        idempotency_key=f"{kind}-{account.pk}-{when.isoformat()}",
        now=when,
    )


def history() -> Account:
    """October's opening credit; November's purchase, grant, refund, adjustment, usage on two
    models, a request written off, and a request placed on Nov 30 that settles on Dec 1 (its
    usage posts into December); December's correction."""
    account = make_account(credits=D("10"), now=t(10, 20))
    key = make_key(account=account, now=t(10, 20)).api_key
    _credit(account, "purchase", "50", t(11, 2))
    _credit(account, "grant", "5", t(11, 3))
    _credit(account, "refund", "3", t(11, 5))
    _credit(account, "adjustment", "-1.5", t(11, 6))
    _request(
        key,
        "nov-a",
        model="gpt-a",
        cost="0.75",
        placed=t(11, 10),
        settled=t(11, 10, 12, 1),
        usage=Usage(
            input_tokens=100, cached_input_tokens=20, output_tokens=50, reasoning_tokens=10
        ),
    )
    _request(
        key,
        "nov-b",
        model="gpt-b",
        cost="0.3",
        placed=t(11, 11),
        settled=t(11, 11, 12, 1),
        usage=Usage(input_tokens=40, output_tokens=8),
    )
    hold_place(
        api_key=key, request_id="nov-forgiven", amount=D("1"), now=t(11, 15), model_alias="gpt-a"
    )
    request_write_off_post(
        request_id="nov-forgiven",
        amount=D("0.2"),
        memo="goodwill",
        now=t(11, 16),
        posted_by_id=None,
    )
    _request(
        key,
        "late",
        model="gpt-a",
        cost="0.4",
        placed=t(11, 30, 23, 59),
        settled=t(12, 1, 0, 5),
        usage=Usage(input_tokens=30, output_tokens=20),
    )
    _credit(account, "adjustment", "0.25", t(12, 2))
    return account


@pytest.mark.django_db
def test_closing_is_opening_plus_movements_and_late_usage_is_next_month() -> None:
    account = history()
    nov = statement_figures_get(account_id=account.pk, month=NOV, now=t(12, 20)).data
    dec = statement_figures_get(account_id=account.pk, month=DEC, now=t(12, 20)).data

    assert nov["opening_balance"] == "10.0000000000"
    assert D(nov["opening_balance"]) == _ledger_total(account.pk, before=t(11, 1, 0))
    assert D(nov["closing_balance"]) == _ledger_total(account.pk, before=t(12, 1, 0))
    assert D(nov["closing_balance"]) == D(nov["opening_balance"]) + sum(
        (D(total) for total in nov["totals"].values()), D(0)
    )
    assert D(nov["closing_balance"]) == D("10") + 50 + 5 + 3 - D("1.5") - D("0.75") - D("0.3")
    assert [
        (row["kind"], row["amount"])
        for key in ("purchases", "grants", "refunds", "adjustments")
        for row in nov[key]
    ] == [
        ("purchase", "50.0000000000"),
        ("grant", "5.0000000000"),
        ("refund", "3.0000000000"),
        ("adjustment", "-1.5000000000"),
    ]
    assert nov["usage"]["by_model"] == [
        {
            "model": "gpt-a",
            "requests": 1,
            "input_tokens": 100,
            "cached_input_tokens": 20,
            "cache_write_tokens": 0,
            "output_tokens": 50,
            "reasoning_tokens": 10,
            "cost": "0.7500000000",
        },
        {
            "model": "gpt-b",
            "requests": 1,
            "input_tokens": 40,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "output_tokens": 8,
            "reasoning_tokens": 0,
            "cost": "0.3000000000",
        },
    ]
    [forgiven] = nov["write_offs"]
    assert (forgiven["request_id"], forgiven["amount"], forgiven["balance_effect"]) == (
        "nov-forgiven",
        "0.2000000000",
        "0.0000000000",
    )
    assert nov["provisional"] is False and "posting time" in nov["basis"]

    # The request placed in November and settled on December 1st is December's movement.
    assert dec["opening_balance"] == nov["closing_balance"]
    assert [row["model"] for row in dec["usage"]["by_model"]] == ["gpt-a"]
    assert dec["usage"]["cost"] == "0.4000000000"
    assert dec["adjustments"][0]["amount"] == "0.2500000000"
    assert dec["provisional"] is True
    account.refresh_from_db()
    assert (
        D(dec["closing_balance"]) == account.balance == _ledger_total(account.pk, before=t(12, 31))
    )
    # What the requests cost us upstream is ours: never on the customer's statement.
    assert "provider" not in json.dumps([nov, dec])
    assert ledger_audit().clean
    assert not Hold.objects.filter(state=Hold.State.ACTIVE).exists()


@pytest.mark.django_db
def test_a_month_not_started_and_a_malformed_month_are_refused() -> None:
    account = history()
    with pytest.raises(Exception, match="has not started"):
        statement_figures_get(account_id=account.pk, month=date(2027, 1, 1), now=t(12, 20))
    out, err = StringIO(), StringIO()
    with pytest.raises(Exception, match="YYYY-MM"):
        call_command(
            "account_statement",
            str(account.pk),
            "--month",
            "2026-13",
            "--json",
            stdout=out,
            stderr=err,
        )


@pytest.mark.django_db
def test_command_json_is_one_line_with_balances_at_the_top_and_keeps_its_old_output() -> None:
    account = history()
    out = StringIO()
    call_command("account_statement", str(account.pk), "--month", "2026-11", "--json", stdout=out)
    [line] = out.getvalue().splitlines()
    figures = json.loads(line)
    assert figures["opening_balance"] == "10.0000000000"
    assert figures["closing_balance"] == "65.4500000000"
    assert figures["month"] == "2026-11"

    out = StringIO()
    call_command("account_statement", str(account.pk), "--json", stdout=out)
    plain = json.loads(out.getvalue())
    assert set(plain) >= {"balance", "held", "available", "entries"}
    assert "closing_balance" not in plain


def _pdf_text(path: Path) -> str:
    return subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout


@pytest.mark.django_db
def test_statement_pdf_renders_and_its_closing_balance_matches_the_ledger(tmp_path: Path) -> None:
    account = history()
    pdf = tmp_path / "statement-2026-11.pdf"
    call_command(
        "account_statement",
        str(account.pk),
        "--month",
        "2026-11",
        "--pdf",
        str(pdf),
        stdout=StringIO(),
    )
    assert pdf.read_bytes().startswith(b"%PDF")
    text = _pdf_text(pdf)
    closing = _ledger_total(account.pk, before=t(12, 1, 0))
    assert closing == D("65.45")
    assert "Closing balance" in text and "65.45" in text
    assert "Opening balance" in text and "10.00" in text
    assert "gpt-a" in text and "gpt-b" in text and "nov-forgiven" in text
    subprocess.run(["pdftoppm", "-png", "-r", "80", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert pages and all(page.read_bytes().startswith(b"\x89PNG") for page in pages)


@pytest.mark.django_db
def test_issued_statement_never_changes_and_a_correction_shows_next_month() -> None:
    account = history()
    first = statements_issue_for_month(month=NOV, now=t(12, 1, 0, 30))
    assert first == {"month": "2026-11", "issued": 1, "already_issued": 0}
    issued = Statement.objects.get(account=account, month=NOV)
    assert bytes(issued.pdf).startswith(b"%PDF")
    assert issued.figures["closing_balance"] == "65.4500000000"
    assert issued.figures["issued_at"] == t(12, 1, 0, 30).isoformat()

    # A correction of a November charge, posted in December.
    _credit(account, "adjustment", "0.75", t(12, 3))
    again, created = statement_issue(account_id=account.pk, month=NOV, now=t(12, 4))
    assert not created and again.pk == issued.pk
    assert again.figures == issued.figures and bytes(again.pdf) == bytes(issued.pdf)
    assert statements_issue_for_month(month=NOV, now=t(12, 4))["already_issued"] == 1
    dec = statement_figures_get(account_id=account.pk, month=DEC, now=t(12, 20)).data
    assert [row["amount"] for row in dec["adjustments"]] == ["0.2500000000", "0.7500000000"]
    with pytest.raises(Exception, match="has not ended"):
        statement_issue(account_id=account.pk, month=DEC, now=t(12, 20))


@pytest.mark.django_db
def test_the_first_of_the_month_schedule_is_installed() -> None:
    task = PeriodicTask.objects.get(name="Issue last month's statements")
    assert task.task == "reconciliation.statements_issue" and task.enabled
    assert (task.crontab.day_of_month, task.crontab.hour, task.crontab.minute) == ("1", "0", "30")


def test_the_task_issues_statements_on_a_real_worker(running_worker, transactional_db) -> None:  # type: ignore[no-untyped-def]
    account = history()
    statements_issue.apply_async(kwargs={"month": "2026-11"})
    statement = wait_until(
        lambda: Statement.objects.filter(account=account, month=NOV).first(), timeout=60
    )
    assert statement.figures["closing_balance"] == "65.4500000000"
    assert bytes(statement.pdf).startswith(b"%PDF")


def test_the_api_serves_json_and_pdf_to_the_accounts_admin_key_only(
    live_gateway, transactional_db
) -> None:  # type: ignore[no-untyped-def]
    account = history()
    admin_key = make_key(account=account, scope=ApiKey.Scope.ADMIN).secret
    inference_key = make_key(account=account).secret
    stranger = make_account(credits=D("1"))
    stranger_key = make_key(account=stranger, scope=ApiKey.Scope.ADMIN).secret

    def get(path: str, key: str) -> httpx.Response:
        return httpx.get(
            f"{live_gateway.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    answer = get("/v1/billing/statements/2026-11", admin_key)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["opening_balance"], body["closing_balance"]) == ("10.0000000000", "65.4500000000")
    assert body["account_id"] == account.pk and "provider_cost" not in answer.text

    pdf = get("/v1/billing/statements/2026-11.pdf", admin_key)
    assert pdf.status_code == 200
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")

    refused = get("/v1/billing/statements/2026-11", inference_key)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"
    for bad in ("2026-13", "2999-01", "november"):
        wrong = get(f"/v1/billing/statements/{bad}", admin_key)
        assert wrong.status_code == 400, (bad, wrong.text)
        assert wrong.json()["error"]["type"] == "invalid_request_error"
    # Another account's key sees its own account's statement, never this one's.
    theirs = get("/v1/billing/statements/2026-11", stranger_key).json()
    assert theirs["account_id"] == stranger.pk


@pytest.mark.django_db
def test_admin_shows_the_month_as_html_and_pdf_and_keeps_the_entry_list() -> None:
    account = history()
    finance = User.objects.create_user("fin", password="x", is_staff=True)
    finance.groups.add(Group.objects.get(name="Finance"))
    client = Client()
    client.force_login(finance)
    url = f"/admin/billing/account/{account.pk}/statement/"

    every_entry = client.get(url)
    assert every_entry.status_code == 200
    assert b'id="statement"' in every_entry.content  # the default view, as before
    assert b"?month=2026-11" in every_entry.content

    month = client.get(url, {"month": "2026-11"})
    assert month.status_code == 200
    assert b'id="closing-balance">65.45<' in month.content
    assert b'id="opening-balance">10.00<' in month.content

    pdf = client.get(url, {"month": "2026-11", "format": "pdf"})
    assert pdf["Content-Type"] == "application/pdf" and pdf.content.startswith(b"%PDF")

    outsider = User.objects.create_user("staff", password="x", is_staff=True)
    client.force_login(outsider)
    assert client.get(url, {"month": "2026-11"}).status_code == 403
