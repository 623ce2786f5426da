"""Issue 17, item 7: every new back-office action is refused to staff outside Finance (a 403,
and no button to it), and allowed to Finance through the group's permissions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.urls import reverse

from billing.models import Account, ApiKey
from gateway.models import Route, Upstream
from gateway.services import route_save, upstream_save
from reconciliation.models import StaffAction
from tests.factories import make_account, make_key

pytestmark = pytest.mark.django_db

BACK_OFFICE_PERMISSIONS = {
    "billing.add_account",
    "billing.add_apikey",
    "billing.change_apikey",
    "gateway.view_upstream",
    "gateway.add_upstream",
    "gateway.change_upstream",
    "gateway.view_route",
    "gateway.add_route",
    "gateway.change_route",
}
VIEW_PERMISSIONS = [
    "view_account",
    "view_apikey",
    "view_ledgertransaction",
    "view_hold",
    "view_upstream",
    "view_route",
]


@pytest.fixture
def world(db: None) -> dict[str, object]:
    account = make_account()
    key = make_key(account=account).api_key
    upstream = upstream_save(
        upstream_id=None, name="up", kind="openai", base_url="https://upstream.test/v1"
    )
    route = route_save(route_id=None, alias="m-perm", upstream_id=upstream.pk)
    return {"account": account, "key": key, "upstream": upstream, "route": route}


def client_for(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer(db: None) -> Client:
    """Staff who may read everything here but is not in Finance."""
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=VIEW_PERMISSIONS))
    return client_for(user)


@pytest.fixture
def bare_staff(db: None) -> Client:
    return client_for(User.objects.create_user("staff", password="pw", is_staff=True))


@pytest.fixture
def finance(db: None) -> Client:
    user = User.objects.create_user("finance", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    return client_for(user)


def _urls(world: dict[str, object]) -> dict[str, str]:
    key = world["key"]
    upstream = world["upstream"]
    route = world["route"]
    assert isinstance(key, ApiKey) and isinstance(upstream, Upstream)
    assert isinstance(route, Route)
    return {
        "account_add": reverse("admin:billing_account_add"),
        "key_issue": reverse("admin:billing_apikey_add"),
        "key_budget": reverse("admin:billing_apikey_budget", args=[key.pk]),
        "key_rate_limits": reverse("admin:billing_apikey_rate_limits", args=[key.pk]),
        "upstream_add": reverse("admin:gateway_upstream_add"),
        "upstream_change": reverse("admin:gateway_upstream_change", args=[upstream.pk]),
        "route_add": reverse("admin:gateway_route_add"),
        "route_change": reverse("admin:gateway_route_change", args=[route.pk]),
    }


def _posts(world: dict[str, object]) -> dict[str, dict[str, str]]:
    """A complete, confirmed submission of each action: what a forged request would send."""
    account = world["account"]
    upstream = world["upstream"]
    assert isinstance(account, Account) and isinstance(upstream, Upstream)
    return {
        "account_add": {
            "name": "Forged",
            "overdraft": "0",
            "opening_credit_kind": "grant",
            "memo": "m",
            "form_key": "f" * 32,
            "confirm": "1",
        },
        "key_issue": {
            "account": str(account.pk),
            "purpose": "realtime",
            "scope": "admin",
            "memo": "m",
            "form_key": "k" * 32,
            "confirm": "1",
        },
        "key_budget": {"budget_limit": "1", "budget_period": "day", "memo": "m", "confirm": "1"},
        "key_rate_limits": {"rpm": "1", "tpm": "1", "memo": "m", "confirm": "1"},
        "upstream_add": {
            "name": "forged",
            "kind": "openai",
            "base_url": "https://forged.test/v1",
            "connect_timeout_seconds": "10",
            "read_timeout_seconds": "120",
            "memo": "m",
        },
        "upstream_change": {
            "name": "up",
            "kind": "openai",
            "base_url": "https://forged.test/v1",
            "connect_timeout_seconds": "10",
            "read_timeout_seconds": "120",
            "memo": "m",
        },
        "route_add": {
            "alias": "forged",
            "upstream": str(upstream.pk),
            "max_output_tokens": "10",
            "memo": "m",
        },
        "route_change": {
            "alias": "m-perm",
            "upstream": str(upstream.pk),
            "upstream_model": "forged",
            "max_output_tokens": "10",
            "memo": "m",
        },
    }


ACTIONS = [
    "account_add",
    "key_issue",
    "key_budget",
    "key_rate_limits",
    "upstream_add",
    "upstream_change",
    "route_add",
    "route_change",
]


def _nothing_changed(world: dict[str, object]) -> None:
    assert not Account.objects.filter(name="Forged").exists()
    assert ApiKey.objects.count() == 1
    key = world["key"]
    assert isinstance(key, ApiKey)
    key.refresh_from_db()
    assert key.budget_limit is None
    assert (key.rpm, key.tpm) == (None, None)
    assert list(Upstream.objects.values_list("base_url", flat=True)) == ["https://upstream.test/v1"]
    assert list(Route.objects.values_list("upstream_model", flat=True)) == ["m-perm"]
    assert not StaffAction.objects.exists()


@pytest.mark.parametrize("who", ["viewer", "bare_staff"])
@pytest.mark.parametrize("action", ACTIONS)
def test_staff_outside_finance_are_refused_every_new_action(request, world, who, action):
    client: Client = request.getfixturevalue(who)
    url = _urls(world)[action]

    posted = client.post(url, _posts(world)[action])

    assert posted.status_code == 403
    if not action.endswith("_change"):  # a change page is readable with the view permission
        assert client.get(url).status_code == 403
    _nothing_changed(world)


@pytest.mark.parametrize("action", ACTIONS)
def test_finance_may_open_every_new_action(finance, world, action):
    assert finance.get(_urls(world)[action]).status_code == 200


def test_staff_outside_finance_see_no_button_to_the_new_actions(viewer, finance, world):
    account = world["account"]
    key = world["key"]
    assert isinstance(account, Account) and isinstance(key, ApiKey)
    urls = _urls(world)
    pages = {
        reverse("admin:billing_account_changelist"): [urls["account_add"]],
        reverse("admin:billing_account_change", args=[account.pk]): [
            urls["key_issue"],
            urls["key_budget"],
            reverse("admin:billing_apikey_revoke"),
        ],
        reverse("admin:billing_apikey_changelist"): [urls["key_issue"]],
        reverse("admin:billing_apikey_change", args=[key.pk]): [
            urls["key_budget"],
            urls["key_rate_limits"],
        ],
        reverse("admin:gateway_upstream_changelist"): [urls["upstream_add"]],
        reverse("admin:gateway_route_changelist"): [urls["route_add"]],
    }
    for page, links in pages.items():
        seen_by_viewer = viewer.get(page)
        seen_by_finance = finance.get(page).content.decode()
        assert seen_by_viewer.status_code == 200, page
        for link in links:
            assert f'href="{link}' not in seen_by_viewer.content.decode(), (page, link)
            assert f'href="{link}' in seen_by_finance, (page, link)


@pytest.mark.parametrize(
    "grant",
    [
        lambda user: user.user_permissions.add(Permission.objects.get(codename="add_account")),
        lambda user: user.groups.add(Group.objects.get(name="Finance")),
    ],
    ids=["permission", "finance-group"],
)
def test_the_permission_alone_opens_the_action(db, grant: Callable[[User], None]):
    user = User.objects.create_user("granted", password="pw", is_staff=True)
    grant(user)

    assert client_for(user).get(reverse("admin:billing_account_add")).status_code == 200


def test_the_finance_group_holds_the_back_office_permissions(db):
    group = Group.objects.get(name="Finance")
    held = {
        f"{app}.{codename}"
        for app, codename in group.permissions.values_list("content_type__app_label", "codename")
    }

    assert held >= BACK_OFFICE_PERMISSIONS
    assert "gateway.delete_route" not in held and "billing.delete_apikey" not in held


def test_the_back_office_migration_adds_and_removes_the_permissions(db):
    from importlib import import_module

    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    migration = import_module("reconciliation.migrations.0007_back_office")
    # The migration's own historical models, as `migrate` hands them to it.
    apps = (
        MigrationExecutor(connection)
        .loader.project_state(("reconciliation", "0007_back_office"))
        .apps
    )
    group = Group.objects.get(name="Finance")

    def held() -> set[str]:
        return {
            f"{app}.{codename}"
            for app, codename in group.permissions.values_list(
                "content_type__app_label", "codename"
            )
        }

    migration.back_office_permissions_remove(apps, None)
    assert not held() & BACK_OFFICE_PERMISSIONS
    assert "billing.post_adjustment" in held()  # the group's earlier permissions stay

    migration.back_office_permissions_add(apps, None)
    assert held() >= BACK_OFFICE_PERMISSIONS


def test_an_account_opener_without_credit_permission_is_told_the_credit_is_not_posted(db):
    user = User.objects.create_user("opener", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["add_account", "view_account"])
    )
    client = client_for(user)
    fields = {
        "name": "Opened",
        "overdraft": "0",
        "opening_credit": "5",
        "opening_credit_kind": "grant",
        "memo": "m",
        "form_key": "a" * 32,
        "confirm": "1",
    }

    answer = client.post(reverse("admin:billing_account_add"), fields, follow=True)

    account = Account.objects.get(name="Opened")
    assert answer.redirect_chain[-1][0] == reverse(
        "admin:billing_account_change", args=[account.pk]
    )
    assert "is not posted" in answer.content.decode()
    assert account.balance == 0
    assert list(StaffAction.objects.values_list("action", flat=True)) == ["account_open"]
