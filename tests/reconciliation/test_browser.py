"""End to end in a real browser: a finance user writes off a deduction failure from the admin
and finds the balanced entries in the ledger.

Debian's chromium driven by Playwright (its own browser download is unavailable offline).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, User
from django.db import connection

from billing.models import SYSTEM_ACCOUNT_IDS, Account, LedgerTransaction
from billing.services.holds import hold_place
from reconciliation.models import ReconciliationItem, StaffAction

# Playwright's sync API runs an event loop in this thread; the ORM calls the test makes between
# browser steps are still plain synchronous calls, so Django's guard can stand down here.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COST = Decimal("0.1234567891")

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def page() -> Iterator:  # type: ignore[type-arg]
    from playwright.sync_api import sync_playwright

    # No skip: CI installs chromium, and a missing browser must fail loudly.
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context()
        context.set_default_timeout(15_000)
        try:
            yield context.new_page()
        finally:
            # Close the context first so no request of the page is left in flight against the
            # live server while the test database is flushed.
            context.close()
            browser.close()
            # While Playwright's loop runs in this thread, the test's ORM calls get their own
            # connection (asgiref keeps connections per context): give it back to the pool
            # here, or it stays checked out and open until the test database is dropped.
            connection.close()


def test_finance_user_writes_off_a_failure_and_sees_balanced_entries(
    live_server, page, issued_key, now
):
    user = User.objects.create_user("alice", password="correct horse", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    hold_place(api_key=issued_key.api_key, request_id="req-browser", amount=Decimal("1"), now=now)
    item = ReconciliationItem.objects.create(
        kind=ReconciliationItem.Kind.DEDUCTION_FAILURE,
        request_id="req-browser",
        account_id=issued_key.api_key.account_id,
        key_prefix=issued_key.api_key.prefix,
        model_alias="gpt-test",
        cost=COST,
        held_amount=Decimal("1"),
        error="OperationalError: connection refused",
        attempts=26,
        created_at=now,
    )

    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "correct horse")
    page.click("input[type=submit]")
    page.wait_for_selector("#user-tools")

    page.goto(f"{live_server.url}/admin/reconciliation/reconciliationitem/?status__exact=pending")
    page.click(f"#result_list a[href*='/reconciliationitem/{item.pk}/change/']")
    page.click("text=Write off")
    assert "write off 0.1234567891 USD" in page.inner_text("#effects")
    page.fill("textarea[name=memo]", "Customer goodwill, ticket 314")
    page.click("input[name=confirm]")
    page.wait_for_selector("ul.messagelist")
    assert "posted write_off transaction" in page.inner_text("ul.messagelist")

    page.goto(f"{live_server.url}/admin/billing/ledgertransaction/?kind__exact=write_off")
    assert "req-browser" in page.inner_text("#result_list")
    page.click("#result_list tbody tr th a")
    legs = page.inner_text("#legs-group")
    assert "Revenue (usage)" in legs
    assert "Write-offs" in legs
    assert "0.1234567891" in legs
    assert "-0.1234567891" in legs

    txn = LedgerTransaction.objects.get(request_id="req-browser")
    assert {leg.account_id: leg.amount for leg in txn.legs.all()} == {
        SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE]: COST,
        SYSTEM_ACCOUNT_IDS[Account.Kind.WRITE_OFFS]: -COST,
    }
    assert StaffAction.objects.get().memo == "Customer goodwill, ticket 314"
