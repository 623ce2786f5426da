"""In a real browser: a finance user creates a checkout link for a customer from the admin
(confirmed, recorded), and the dummy provider's page pays it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, User
from django.db import connection

from billing.models import Account, Checkout, LedgerTransaction
from reconciliation.models import StaffAction
from tests.billing.payments.conftest import assert_books_clean

# Playwright's sync API runs an event loop in this thread; the test's ORM calls between
# browser steps are plain synchronous calls.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def page() -> Iterator:  # type: ignore[type-arg]
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context()
        context.set_default_timeout(15_000)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()
            connection.close()


def test_finance_creates_a_checkout_link_and_the_dummy_checkout_pays_it(
    live_server, page, account, settings  # type: ignore[no-untyped-def]
) -> None:
    settings.PAYMENTS_PROVIDER = "dummy"
    user = User.objects.create_user("fiona", password="correct horse", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    before = Account.objects.get(pk=account.pk).balance

    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "fiona")
    page.fill("#id_password", "correct horse")
    page.click("input[type=submit]")
    page.wait_for_selector("#user-tools")

    page.goto(f"{live_server.url}/admin/billing/checkout/")
    page.click("#create-checkout-link")
    page.fill("input[name=account_id]", str(account.pk))
    page.fill("input[name=amount]", "4.99")  # below PAYMENTS_MIN_TOPUP
    page.fill("textarea[name=memo]", "Customer asked by phone, ticket 77")
    page.click("input[name=preview]")
    assert "between 5.0000000000 and 10000.0000000000" in page.inner_text("#content-main")
    page.fill("input[name=amount]", "20.00")
    page.click("input[name=preview]")
    assert "20.00" in page.inner_text("#content-main")
    assert not Checkout.objects.exists()  # nothing until confirmed
    page.click("input[name=confirm]")
    link = page.get_attribute("#checkout-link", "href")
    assert link is not None and "/payments/dummy/checkout/cs_dummy_" in link

    page.goto(link)
    assert "20.00 USD" in page.inner_text("#amount")
    page.click("#pay")
    page.wait_for_selector("#status")
    assert "Paid" in page.inner_text("#status")

    assert Account.objects.get(pk=account.pk).balance == before + Decimal("20")
    checkout = Checkout.objects.get()
    assert (checkout.status, checkout.created_by_id) == ("completed", user.pk)
    assert LedgerTransaction.objects.get(kind="purchase").pk == checkout.transaction_id
    action = StaffAction.objects.get(action="checkout_link")
    assert action.memo == "Customer asked by phone, ticket 77"
    assert action.details["session_id"] == checkout.session_id

    # The stored events show what they caused.
    page.goto(f"{live_server.url}/admin/billing/paymentevent/")
    listing = page.inner_text("#result_list")
    assert "checkout.session.completed" in listing
    assert f"#{checkout.transaction_id}" in listing
    assert_books_clean()


def test_a_staff_user_without_the_permission_cannot_create_links(
    live_server, page, account  # type: ignore[no-untyped-def]
) -> None:
    User.objects.create_user("sam", password="correct horse", is_staff=True)
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "sam")
    page.fill("#id_password", "correct horse")
    page.click("input[type=submit]")
    page.wait_for_selector("#user-tools")
    answer = page.goto(f"{live_server.url}/admin/billing/checkout/link/")
    assert answer is not None and answer.status == 403
    assert not Checkout.objects.exists()
