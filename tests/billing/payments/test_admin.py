"""The payments admin: finance sets an account's auto top-up and alerts through a reviewed,
recorded change; the account page shows the fields; events, attempts and deliveries list."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client

from billing.models import Account
from reconciliation.models import StaffAction

pytestmark = pytest.mark.django_db


@pytest.fixture
def finance_client(db) -> Client:  # type: ignore[no-untyped-def]
    user = User.objects.create_user("fin", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    client = Client()
    client.force_login(user)
    return client


def test_finance_sets_auto_topup_after_a_review_and_it_is_recorded(
    finance_client: Client, account  # type: ignore[no-untyped-def]
) -> None:
    url = f"/admin/billing/autotopupattempt/settings/{account.pk}/"
    form = {"enabled": "on", "auto_topup_threshold": "5", "auto_topup_amount": "20",
            "auto_topup_monthly_limit": "60", "memo": "customer asked"}
    assert finance_client.get(url).status_code == 200
    review = finance_client.post(url, {**form, "preview": "1"})
    assert b"Yes, save it" in review.content
    assert not Account.objects.get(pk=account.pk).auto_topup_enabled  # not before confirming
    done = finance_client.post(url, {**form, "confirm": "1"})
    assert b"Saved" in done.content
    row = Account.objects.get(pk=account.pk)
    assert (row.auto_topup_enabled, row.auto_topup_amount) == (True, Decimal("20"))
    action = StaffAction.objects.get(action="set_auto_topup")
    assert action.memo == "customer asked"
    assert action.details["auto_topup_monthly_limit"] == "60.0000000000"
    bad = finance_client.post(url, {**form, "auto_topup_amount": "1", "confirm": "1"})
    assert b"auto_topup_amount" in bad.content
    assert Account.objects.get(pk=account.pk).auto_topup_amount == Decimal("20")


def test_finance_sets_alerts_and_sees_the_new_secret_once(
    finance_client: Client, account  # type: ignore[no-untyped-def]
) -> None:
    url = f"/admin/billing/notification/alerts/{account.pk}/"
    form = {"low_balance_threshold": "2.5", "webhook_url": "https://example.com/h",
            "billing_email": "b@example.com", "memo": "onboarding"}
    done = finance_client.post(url, {**form, "confirm": "1"})
    secret = Account.objects.get(pk=account.pk).webhook_secret
    assert secret.startswith("whsec_") and secret.encode() in done.content
    action = StaffAction.objects.get(action="set_alerts")
    assert secret not in str(action.details)  # the secret is never recorded
    again = finance_client.post(url, {**form, "confirm": "1"})
    assert b"whsec_" not in again.content  # shown once


def test_without_the_permission_the_settings_pages_are_refused(account) -> None:  # type: ignore[no-untyped-def]
    User.objects.create_user("staff", password="pw", is_staff=True)
    client = Client()
    client.login(username="staff", password="pw")
    for url in (f"/admin/billing/autotopupattempt/settings/{account.pk}/",
                f"/admin/billing/notification/alerts/{account.pk}/",
                "/admin/billing/checkout/link/"):
        assert client.get(url).status_code == 403


def test_the_payments_lists_and_the_account_page_render(admin_client: Client, account) -> None:  # type: ignore[no-untyped-def]
    for path in ("paymentevent", "checkout", "autotopupattempt", "notification",
                 "notificationdelivery"):
        assert admin_client.get(f"/admin/billing/{path}/").status_code == 200
    page = admin_client.get(f"/admin/billing/account/{account.pk}/change/")
    assert page.status_code == 200
    assert b"Auto topup monthly limit" in page.content
