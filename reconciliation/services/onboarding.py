"""Onboarding by finance staff in the admin: customer accounts, API keys with their budgets
and rate limits, upstreams and routes, each with its StaffAction in the same transaction.

Money does not move here: an account's opening credit is a grant or purchase posted through
`credit_post_by_staff` on its own confirmation page. A key's secret is returned once, to the
page that shows it, and is never recorded: not in the StaffAction, not in a log.

Confirmation forms carry a key minted when the form was rendered (`form_key`); submitting
the same form twice (a double click, a reload of the confirmation) creates nothing new and
returns what the first submit created.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction

from billing.errors import ApiKeyInactive, ApiKeyNotFound, InvalidAmount
from billing.models import Account, ApiKey
from billing.money import ZERO, money_str
from billing.services.keys import IssuedKey, api_key_issue, api_key_update
from gateway.models import Route, Upstream
from gateway.services import route_save, upstream_save
from reconciliation.models import StaffAction
from reconciliation.services.finance import _memo_clean, _staff_action_record


def _form_replayed(*, action: str, form_key: str) -> StaffAction | None:
    """The StaffAction an earlier submit of this form recorded, if any. Serialised per form
    key (a transaction-scoped advisory lock), so two submits racing cannot both create."""
    if not form_key.strip():
        raise InvalidAmount("a form key is required")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [form_key])
    return StaffAction.objects.filter(action=action, details__form_key=form_key).first()


@dataclass(frozen=True)
class AccountOpened:
    account: Account
    replayed: bool  # True when this form had opened it already: nothing new was created


def account_open_by_staff(
    *,
    name: str,
    billing_email: str,
    overdraft: Decimal,
    user: AbstractBaseUser,
    memo: str,
    form_key: str,
    now: datetime,
) -> AccountOpened:
    """Create a customer account at a zero balance, with its StaffAction."""
    memo = _memo_clean(memo)
    name = name.strip()
    if not name:
        raise InvalidAmount("an account needs a name")
    if overdraft < ZERO:
        raise InvalidAmount("the overdraft cannot be negative")
    with transaction.atomic(durable=True):
        earlier = _form_replayed(action="account_open", form_key=form_key)
        if earlier is not None:
            account = Account.objects.get(pk=earlier.details["account_id"])
            return AccountOpened(account=account, replayed=True)
        account = Account.objects.create(
            name=name, billing_email=billing_email.strip(), overdraft=overdraft
        )
        _staff_action_record(
            user=user,
            action="account_open",
            target=f"account #{account.pk}",
            memo=memo,
            now=now,
            details={
                "account_id": account.pk,
                "name": account.name,
                "billing_email": account.billing_email,
                "overdraft": money_str(overdraft),
                "form_key": form_key,
            },
        )
    return AccountOpened(account=account, replayed=False)


@dataclass(frozen=True)
class KeyIssued:
    api_key: ApiKey
    # The secret, to show once; None when this form had issued the key already (a reload):
    # the secret was shown then and cannot be shown again.
    secret: str | None


def api_key_issue_by_staff(
    *,
    account_id: int,
    name: str,
    purpose: str,
    scope: str,
    budget_limit: Decimal | None,
    budget_period: str,
    rpm: int | None,
    tpm: int | None,
    expires_at: datetime | None,
    user: AbstractBaseUser,
    memo: str,
    form_key: str,
    now: datetime,
) -> KeyIssued:
    """Issue a key on a customer account (billing.services.keys), with its StaffAction.
    The StaffAction names the key by id and prefix, never by its secret."""
    memo = _memo_clean(memo)
    with transaction.atomic(durable=True):
        earlier = _form_replayed(action="api_key_issue", form_key=form_key)
        if earlier is not None:
            return KeyIssued(
                api_key=ApiKey.objects.get(pk=earlier.details["api_key_id"]), secret=None
            )
        issued: IssuedKey = api_key_issue(
            account_id=account_id,
            now=now,
            name=name.strip(),
            purpose=purpose,
            scope=scope,
            budget_limit=budget_limit,
            budget_period=budget_period,
            rpm=rpm,
            tpm=tpm,
            expires_at=expires_at,
        )
        api_key = issued.api_key
        _staff_action_record(
            user=user,
            action="api_key_issue",
            target=_key_target(api_key),
            memo=memo,
            now=now,
            details={
                **_key_ids(api_key),
                "name": api_key.name,
                "purpose": api_key.purpose,
                "scope": api_key.scope,
                "budget_limit": None if budget_limit is None else money_str(budget_limit),
                "budget_period": budget_period,
                **_rate_limits_details(api_key),
                "expires_at": expires_at.isoformat() if expires_at else None,
                "form_key": form_key,
            },
        )
    return KeyIssued(api_key=api_key, secret=issued.secret)


def api_key_budget_set_by_staff(
    *,
    key_id: int,
    budget_limit: Decimal | None,
    budget_period: str,
    user: AbstractBaseUser,
    memo: str,
    now: datetime,
) -> ApiKey:
    """Change a key's budget (None and "" remove it) through `api_key_update`, with its
    StaffAction (the budget before and after). Spend and holds already counted stay."""
    return _key_setting_set(
        key_id=key_id,
        changes={"budget_limit": budget_limit, "budget_period": budget_period},
        details_of=_budget_details,
        action="api_key_budget_set",
        user=user,
        memo=memo,
        now=now,
    )


def api_key_rate_limits_set_by_staff(
    *,
    key_id: int,
    rpm: int | None,
    tpm: int | None,
    user: AbstractBaseUser,
    memo: str,
    now: datetime,
) -> ApiKey:
    """Change a key's rate limits (None removes one) through `api_key_update`, with its
    StaffAction (the limits before and after)."""
    return _key_setting_set(
        key_id=key_id,
        changes={"rpm": rpm, "tpm": tpm},
        details_of=_rate_limits_details,
        action="api_key_rate_limits_set",
        user=user,
        memo=memo,
        now=now,
    )


def _key_setting_set(
    *,
    key_id: int,
    changes: dict[str, Any],
    details_of: Callable[[ApiKey], dict[str, Any]],
    action: str,
    user: AbstractBaseUser,
    memo: str,
    now: datetime,
) -> ApiKey:
    """`api_key_update(**changes)` on the locked key, and its StaffAction: `details_of` the key
    before and after. A key revoked since its page was shown is refused here, under its lock
    (ApiKeyInactive): a revoked key's settings never change."""
    memo = _memo_clean(memo)
    with transaction.atomic(durable=True):
        try:
            locked = ApiKey.objects.select_for_update().get(pk=key_id)
        except ApiKey.DoesNotExist as exc:
            raise ApiKeyNotFound(f"no API key {key_id}") from exc
        if locked.status != ApiKey.Status.ACTIVE:
            raise ApiKeyInactive(api_key_id=key_id, reason=locked.status)
        before = details_of(locked)
        api_key = api_key_update(key_id=key_id, account_id=locked.account_id, now=now, **changes)
        _staff_action_record(
            user=user,
            action=action,
            target=_key_target(api_key),
            memo=memo,
            now=now,
            details={**_key_ids(api_key), "before": before, "after": details_of(api_key)},
        )
    return api_key


def _key_target(api_key: ApiKey) -> str:
    return f"API key #{api_key.pk} ({api_key.prefix})"


def _key_ids(api_key: ApiKey) -> dict[str, object]:
    """How a StaffAction names a key: by id and display prefix, never by its secret."""
    return {"api_key_id": api_key.pk, "prefix": api_key.prefix, "account_id": api_key.account_id}


def _budget_details(api_key: ApiKey) -> dict[str, str | None]:
    limit = api_key.budget_limit
    return {
        "budget_limit": None if limit is None else money_str(limit),
        "budget_period": api_key.budget_period,
    }


def _rate_limits_details(api_key: ApiKey) -> dict[str, int | None]:
    return {"rpm": api_key.rpm, "tpm": api_key.tpm}


def upstream_save_by_staff(
    *,
    upstream_id: int | None,
    name: str,
    kind: str,
    base_url: str,
    api_key_env: str,
    connect_timeout_seconds: int,
    read_timeout_seconds: int,
    user: AbstractBaseUser,
    memo: str,
    now: datetime,
) -> Upstream:
    """Add or change an upstream, with its StaffAction (never a credential: only the name of
    the environment variable that holds it). Not durable: the admin's change form runs it in
    its own atomic block (see `tariff_set_by_staff`)."""
    memo = _memo_clean(memo)
    with transaction.atomic():
        upstream = upstream_save(
            upstream_id=upstream_id,
            name=name,
            kind=kind,
            base_url=base_url,
            api_key_env=api_key_env,
            connect_timeout_seconds=connect_timeout_seconds,
            read_timeout_seconds=read_timeout_seconds,
        )
        _staff_action_record(
            user=user,
            action="upstream_add" if upstream_id is None else "upstream_change",
            target=f"upstream #{upstream.pk} ({upstream.name})",
            memo=memo,
            now=now,
            details={
                "upstream_id": upstream.pk,
                "name": upstream.name,
                "kind": upstream.kind,
                "base_url": upstream.base_url,
                "api_key_env": upstream.api_key_env,
                "connect_timeout_seconds": upstream.connect_timeout_seconds,
                "read_timeout_seconds": upstream.read_timeout_seconds,
            },
        )
    return upstream


def route_save_by_staff(
    *,
    route_id: int | None,
    alias: str,
    upstream_id: int,
    upstream_model: str,
    max_output_tokens: int,
    user: AbstractBaseUser,
    memo: str,
    now: datetime,
) -> Route:
    """Add or change a route, with its StaffAction. Not durable, like `upstream_save_by_staff`."""
    memo = _memo_clean(memo)
    with transaction.atomic():
        route = route_save(
            route_id=route_id,
            alias=alias,
            upstream_id=upstream_id,
            upstream_model=upstream_model,
            max_output_tokens=max_output_tokens,
        )
        _staff_action_record(
            user=user,
            action="route_add" if route_id is None else "route_change",
            target=f"route #{route.pk} ({route.model.alias})",
            memo=memo,
            now=now,
            details={
                "route_id": route.pk,
                "model": route.model.alias,
                "upstream_id": route.upstream_id,
                "upstream_model": route.upstream_model,
                "max_output_tokens": route.max_output_tokens,
            },
        )
    return route
