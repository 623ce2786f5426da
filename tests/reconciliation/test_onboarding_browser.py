"""Onboarding end to end in a real browser (issue 17, item 7): a finance user creates an
account with an opening credit, issues a key, sees its secret once (and not on reload), and the
key is then billed on /v1/chat/completions by the live gateway against the mock upstream.

Debian's chromium driven by Playwright, as in test_browser.py; the gateway is a real uvicorn
process (tests/gateway/conftest.py) on the same test database as the admin's live server.
"""

from __future__ import annotations

import re
from decimal import Decimal

import httpx
import pytest
from django.contrib.auth.models import Group, User

from billing.models import Account, ApiKey, Hold, LedgerTransaction
from billing.selectors import ledger_audit
from billing.services.keys import api_key_hash
from reconciliation.models import StaffAction
from tests.gateway.conftest import live_gateway, mock_upstream, priced_models
from tests.reconciliation.test_browser import page

__all__ = ["live_gateway", "mock_upstream", "page"]  # fixtures used below

pytestmark = pytest.mark.django_db(transaction=True)


def login(page, live_server, username: str, password: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_selector("#user-tools")


def test_finance_user_onboards_a_customer_whose_key_is_then_billed(
    live_server, live_gateway, mock_upstream, page
):
    openai_model, _ = priced_models(mock_upstream)
    user = User.objects.create_user("olga", password="correct horse", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    login(page, live_server, "olga", "correct horse")

    # The account, from the Accounts page's standard Add button.
    page.goto(f"{live_server.url}/admin/billing/account/")
    page.click(".object-tools a.addlink")
    page.fill("input[name=name]", "Browser Co")
    page.fill("input[name=billing_email]", "ap@browser.test")
    page.fill("input[name=overdraft]", "0")
    page.fill("input[name=opening_credit]", "5")
    page.select_option("select[name=opening_credit_kind]", "grant")
    page.fill("textarea[name=memo]", "Signed up, ticket 501")
    page.click("input[name=preview]")
    assert page.inner_text("#open-name") == "Browser Co"
    assert "5.0000000000 USD as a grant" in page.inner_text("#open-credit")
    page.click("input[name=confirm]")

    # The opening credit, through the grant's own confirmation page.
    assert page.input_value("input[name=amount]") == "5.0000000000"
    page.click("input[name=preview]")
    assert page.inner_text("#balance-after") == "5.0000000000"
    page.click("input[name=confirm]")
    page.wait_for_selector("ul.messagelist")
    assert "Posted grant of 5.0000000000 USD" in page.inner_text("ul.messagelist")
    account = Account.objects.get(name="Browser Co")
    assert account.balance == Decimal("5")
    assert "5.0000000000 USD" in page.inner_text("#account-figures")

    # A key, issued from the account page: the secret is on the confirmation's answer only.
    page.click("#issue-key")
    page.fill("input[name=name]", "production")
    page.fill("textarea[name=memo]", "First key, ticket 501")
    page.click("input[name=preview]")
    assert "Browser Co" in page.inner_text("#issue-account")
    page.click("input[name=confirm]")
    secret = page.inner_text("#key-secret").strip()
    key = ApiKey.objects.get(account=account)
    assert secret.startswith(key.prefix)
    assert key.secret_hash == api_key_hash(secret)

    page.reload()  # the browser submits the confirmation again: nothing new, no secret
    assert secret not in page.content()
    assert page.is_visible("#key-already-issued")
    assert ApiKey.objects.filter(account=account).count() == 1
    page.goto(f"{live_server.url}/admin/billing/apikey/{key.pk}/change/")
    assert key.prefix in page.content()
    assert secret not in page.content()
    assert all(secret not in str(a.details) + a.memo for a in StaffAction.objects.all())

    # The customer uses it; the account page shows the usage entry.
    answer = httpx.post(
        f"{live_gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}"},
        json={
            "model": openai_model,
            "messages": [{"role": "user", "content": "hello [mock:tokens=7]"}],
        },
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-request-id"]
    cost = Decimal(answer.json()["usage"]["cost"])
    assert cost > 0

    page.goto(f"{live_server.url}/admin/billing/account/{account.pk}/change/")
    entries = page.inner_text("#account-entries")
    assert request_id in entries
    assert re.search(rf"usage\s+\S+\s+{re.escape(request_id)}", entries)
    account.refresh_from_db()
    assert account.balance == Decimal("5") - cost
    assert f"{account.balance} USD" in page.inner_text("#account-figures")
    usage = LedgerTransaction.objects.get(request_id=request_id)
    assert usage.kind == "usage"
    assert {leg.account_id: leg.amount for leg in usage.legs.all()}[account.pk] == -cost
    assert list(StaffAction.objects.order_by("pk").values_list("action", flat=True)) == [
        "account_open",
        "credit_grant",
        "api_key_issue",
    ]
    assert ledger_audit().clean
    assert not Hold.objects.filter(state=Hold.State.ACTIVE).exists()
