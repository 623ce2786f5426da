"""Adding a tariff in the admin: one transaction with its StaffAction, a memo required, refused
without the add permission. Through the Django test client, as a superuser and as Finance."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.admin.models import ADDITION, LogEntry
from django.contrib.auth.models import Group, Permission, User
from django.db import transaction
from django.test import Client
from django.urls import reverse

from billing.errors import InvalidAmount
from billing.models import LanguageModel, Tariff
from billing.services.tariffs import tariff_create, tariff_set
from reconciliation.models import StaffAction
from reconciliation.services.finance import tariff_set_by_staff

pytestmark = pytest.mark.django_db

ADD_URL = reverse("admin:billing_tariff_add")
CHANGELIST_URL = reverse("admin:billing_tariff_changelist")
ALIAS = "gpt-admin"


def client_for(user: User) -> Client:
    # A server error is answered as the 500 a browser would see, not raised into the test.
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


@pytest.fixture
def language_model(db) -> LanguageModel:
    return LanguageModel.objects.create(alias=ALIAS)


@pytest.fixture
def superuser(db) -> User:
    return User.objects.create_superuser("root", password="pw")


@pytest.fixture
def finance_user(db) -> User:
    """In Finance, and granted billing.add_tariff (not a Finance permission: see below)."""
    user = User.objects.create_user("finance", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    user.user_permissions.add(
        Permission.objects.get(content_type__app_label="billing", codename="add_tariff")
    )
    return user


@pytest.fixture
def finance_without_add(db) -> User:
    user = User.objects.create_user("finance-2", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    return user


@pytest.fixture
def viewer(db) -> User:
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(content_type__app_label="billing", codename="view_tariff")
    )
    return user


def tariff_form(model: LanguageModel, **overrides: str) -> dict[str, Any]:
    return {
        "model": str(model.pk),
        "purpose": "realtime",
        "completion_window": "",
        "valid_from_0": "2026-12-01",
        "valid_from_1": "00:00:00",
        "valid_until_0": "",
        "valid_until_1": "",
        "input_per_mtok": "2.5",
        "output_per_mtok": "10",
        "cached_input_per_mtok": "1.25",
        "cache_write_per_mtok": "",
        "reasoning_per_mtok": "12.0000000001",
        "memo": "price list 2026-12",
        **overrides,
    }


@pytest.mark.parametrize("who", ["superuser", "finance_user"])
def test_adding_a_tariff_writes_it_with_one_staff_action(request, language_model, who):
    user = request.getfixturevalue(who)
    client = client_for(user)

    response = client.post(ADD_URL, tariff_form(language_model))

    assert response.status_code == 302
    assert response["Location"] == CHANGELIST_URL
    tariff = Tariff.objects.get()
    assert (tariff.model, tariff.purpose, tariff.completion_window) == (
        language_model,
        "realtime",
        "",
    )
    assert (tariff.input_per_mtok, tariff.output_per_mtok) == (Decimal("2.5"), Decimal(10))
    assert tariff.cached_input_per_mtok == Decimal("1.25")
    assert tariff.cache_write_per_mtok is None
    assert tariff.reasoning_per_mtok == Decimal("12.0000000001")
    assert tariff.valid_from.isoformat() == "2026-12-01T00:00:00+00:00"
    assert tariff.valid_until is None
    action = StaffAction.objects.get()
    assert (action.user, action.action, action.target, action.memo) == (
        user,
        "tariff_set",
        f"model {ALIAS}",
        "price list 2026-12",
    )
    assert action.transaction_id is None
    assert action.details == {
        "tariff_id": tariff.pk,
        "account_id": None,
        "purpose": "realtime",
        "completion_window": "",
        "valid_from": "2026-12-01T00:00:00+00:00",
        "valid_until": None,
        "input_per_mtok": "2.5000000000",
        "output_per_mtok": "10.0000000000",
        "cached_input_per_mtok": "1.2500000000",
        "cache_write_per_mtok": None,
        "reasoning_per_mtok": "12.0000000001",
    }
    # The admin's own history points at the row the service created.
    entry = LogEntry.objects.get()
    assert (entry.action_flag, entry.object_id, entry.user_id) == (
        ADDITION,
        str(tariff.pk),
        user.pk,
    )
    assert entry.object_repr == str(tariff)
    page = client.get(response["Location"]).content.decode()
    assert f"/admin/billing/tariff/{tariff.pk}/change/" in page  # the success message links it


def test_save_and_continue_goes_to_the_created_tariff(finance_user, language_model):
    response = client_for(finance_user).post(ADD_URL, tariff_form(language_model, _continue="1"))

    assert response.status_code == 302
    tariff = Tariff.objects.get()
    assert response["Location"] == reverse("admin:billing_tariff_change", args=[tariff.pk])
    # View-only afterwards (tariffs are append-only): no memo field, no save button.
    page = client_for(finance_user).get(response["Location"])
    assert page.status_code == 200
    assert 'name="memo"' not in page.content.decode()
    assert 'name="_save"' not in page.content.decode()


def test_add_page_asks_for_a_memo(finance_user, language_model):
    page = client_for(finance_user).get(ADD_URL)

    assert page.status_code == 200
    assert 'name="memo"' in page.content.decode()


@pytest.mark.parametrize("memo", ["", "   "])
def test_missing_memo_is_a_form_error_and_writes_nothing(finance_user, language_model, memo):
    response = client_for(finance_user).post(ADD_URL, tariff_form(language_model, memo=memo))

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {"memo": ["This field is required."]}
    assert not Tariff.objects.exists()
    assert not StaffAction.objects.exists()
    assert not LogEntry.objects.exists()


def test_negative_price_is_a_form_error_and_writes_nothing(finance_user, language_model):
    response = client_for(finance_user).post(
        ADD_URL, tariff_form(language_model, output_per_mtok="-1")
    )

    assert response.status_code == 200
    assert response.context["adminform"].form.errors
    assert not Tariff.objects.exists()
    assert not StaffAction.objects.exists()


@pytest.mark.parametrize("who", ["finance_without_add", "viewer"])
def test_staff_without_the_add_permission_is_refused(request, language_model, who):
    client = client_for(request.getfixturevalue(who))

    assert client.get(ADD_URL).status_code == 403
    assert client.post(ADD_URL, tariff_form(language_model)).status_code == 403
    assert not Tariff.objects.exists()
    assert not StaffAction.objects.exists()


# --- The services behind it -------------------------------------------------------------------


class CallerFailed(Exception):
    pass


def test_staff_service_joins_the_callers_transaction_and_rolls_back_with_it(finance_user, now):
    def caller() -> None:
        with transaction.atomic():
            tariff_set_by_staff(
                user=finance_user,
                memo="joins the caller",
                now=now,
                model_alias=ALIAS,
                input_per_mtok=Decimal(1),
                output_per_mtok=Decimal(2),
                valid_from=now,
            )
            assert StaffAction.objects.count() == Tariff.objects.count() == 1
            raise CallerFailed  # after the service returned

    with pytest.raises(CallerFailed):
        caller()

    assert not Tariff.objects.exists()
    assert not StaffAction.objects.exists()
    assert not LanguageModel.objects.filter(alias=ALIAS).exists()


def test_staff_service_needs_a_memo(finance_user, now):
    with pytest.raises(InvalidAmount, match="memo"):
        tariff_set_by_staff(
            user=finance_user,
            memo=" ",
            now=now,
            model_alias=ALIAS,
            input_per_mtok=Decimal(1),
            output_per_mtok=Decimal(2),
            valid_from=now,
        )

    assert not Tariff.objects.exists()
    assert not LanguageModel.objects.filter(alias=ALIAS).exists()


def test_tariff_create_runs_inside_a_transaction_and_tariff_set_stays_durable(now):
    with transaction.atomic():
        tariff = tariff_create(
            model_alias=f" {ALIAS} ",
            input_per_mtok=Decimal(1),
            output_per_mtok=Decimal(2),
            valid_from=now,
        )
        with pytest.raises(RuntimeError, match="durable"):
            tariff_set(
                model_alias=ALIAS,
                input_per_mtok=Decimal(1),
                output_per_mtok=Decimal(2),
                valid_from=now,
            )

    assert tariff.model.alias == ALIAS
    assert Tariff.objects.get().pk == tariff.pk
