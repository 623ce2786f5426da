"""API keys: issued once in clear, stored as a SHA-256 digest."""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import transaction

from billing.errors import AccountNotFound, ApiKeyNotFound, InvalidAmount, InvalidKeyField
from billing.models import Account, ApiKey
from billing.services.budgets import api_key_budget_check

KEY_PREFIX = "sk-gw-"
DISPLAY_PREFIX_LENGTH = 14  # "sk-gw-" plus 8 random characters
MAX_RATE_LIMIT = 2**31 - 1  # ApiKey.rpm and tpm are PositiveIntegerFields


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str  # shown once, never stored


def api_key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Unset(enum.Enum):
    """An argument not given: the key keeps what it has (None means "none")."""

    UNSET = enum.auto()


UNSET = Unset.UNSET


def api_key_rate_limits_check(*, rpm: int | None, tpm: int | None) -> None:
    """Refuse a limit the key cannot have (None is none); also the admin forms' check."""
    for name, limit in (("rpm", rpm), ("tpm", tpm)):
        if limit is not None and not 1 <= limit <= MAX_RATE_LIMIT:
            raise InvalidKeyField(f"{name} must be from 1 to {MAX_RATE_LIMIT}", field=name)


def _budget_checked(*, budget_limit: Decimal | None, budget_period: str) -> None:
    """api_key_budget_check, its refusal naming the field to fix."""
    try:
        api_key_budget_check(budget_limit=budget_limit, budget_period=budget_period)
    except InvalidAmount as exc:
        missing_period = budget_limit is not None and budget_limit >= 0
        field = "budget_period" if missing_period else "budget_limit"
        raise InvalidKeyField(str(exc), field=field) from exc


def api_key_issue(
    *,
    account_id: int,
    now: datetime,
    name: str = "",
    purpose: str = ApiKey.Purpose.REALTIME,
    scope: str = ApiKey.Scope.INFERENCE,
    completion_window: str = "",
    budget_limit: Decimal | None = None,
    budget_period: str = "",
    rpm: int | None = None,
    tpm: int | None = None,
    expires_at: datetime | None = None,
) -> IssuedKey:
    if purpose not in ApiKey.Purpose.values:
        raise InvalidKeyField(f"unknown purpose {purpose!r}", field="purpose")
    if scope not in ApiKey.Scope.values:
        raise InvalidKeyField(f"unknown scope {scope!r}", field="scope")
    _budget_checked(budget_limit=budget_limit, budget_period=budget_period)
    api_key_rate_limits_check(rpm=rpm, tpm=tpm)
    if expires_at is not None and expires_at <= now:
        raise InvalidKeyField("the expiry is in the past", field="expires_at")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    # Not durable: finance's issue (reconciliation.services.onboarding) records its StaffAction
    # in the same transaction, where this block is a savepoint; called alone, it is the
    # outermost transaction, as for the issue_api_key command.
    with transaction.atomic():
        if not Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER).exists():
            raise AccountNotFound(f"no customer account {account_id}")
        api_key = ApiKey.objects.create(
            account_id=account_id,
            name=name,
            prefix=secret[:DISPLAY_PREFIX_LENGTH],
            secret_hash=api_key_hash(secret),
            purpose=purpose,
            scope=scope,
            completion_window=completion_window,
            budget_limit=budget_limit,
            budget_period=budget_period,
            rpm=rpm,
            tpm=tpm,
            expires_at=expires_at,
        )
    return IssuedKey(api_key=api_key, secret=secret)


def api_key_update(
    *,
    key_id: int,
    account_id: int,
    now: datetime,
    name: str | Unset = UNSET,
    budget_limit: Decimal | Unset | None = UNSET,
    budget_period: str | Unset = UNSET,
    rpm: int | Unset | None = UNSET,
    tpm: int | Unset | None = UNSET,
) -> ApiKey:
    """Change the name, budget or rate limits of the account's key `key_id`, under the key's
    row lock; what is not given stays. A budget of None (or a period of "") removes the
    budget, amount and period together. Spend and holds already counted stay: a changed
    period counts from its current start at the next hold or settle (the engine's lazy
    rollover); holds placed without a budget stay outside it. Gateway processes see new rpm
    and tpm within GATEWAY_KEY_CACHE_TTL_SECONDS (their key cache), a new budget at the key's
    next hold (the engine reads the key itself). `now` is when the change is made.

    Not durable: finance's edit (reconciliation.services.onboarding) records its StaffAction
    in the same transaction; called alone (the self-service API), it is its own."""
    with transaction.atomic():
        try:
            api_key = ApiKey.objects.select_for_update().get(pk=key_id, account_id=account_id)
        except ApiKey.DoesNotExist as exc:
            raise ApiKeyNotFound(f"no API key {key_id} in account {account_id}") from exc
        changes: dict[str, object] = {"name": name, "rpm": rpm, "tpm": tpm}
        if budget_limit is not UNSET or budget_period is not UNSET:
            if budget_limit is None and budget_period not in (UNSET, ""):
                raise InvalidKeyField("a budget period needs a budget", field="budget_limit")
            if budget_limit is None or budget_period == "":
                limit, period = None, ""
            else:
                limit = api_key.budget_limit if budget_limit is UNSET else budget_limit
                period = api_key.budget_period if budget_period is UNSET else budget_period
            _budget_checked(budget_limit=limit, budget_period=period)
            changes |= {"budget_limit": limit, "budget_period": period}
        api_key_rate_limits_check(
            rpm=api_key.rpm if rpm is UNSET else rpm, tpm=api_key.tpm if tpm is UNSET else tpm
        )
        changed = [field for field, value in changes.items() if value is not UNSET]
        for field in changed:
            setattr(api_key, field, changes[field])
        if changed:
            api_key.save(update_fields=changed)
    return api_key


@dataclass(frozen=True)
class RevokedKey:
    api_key: ApiKey
    changed: bool  # False when the key was revoked already: nothing was written


def api_key_revoke_locked(*, key_id: int, now: datetime) -> RevokedKey:
    """Revoke a key inside the caller's transaction (finance's, which records the StaffAction
    in it); the key's row lock lasts until that transaction ends. Revoking twice is a no-op."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("api_key_revoke_locked needs the caller's transaction")
    try:
        api_key = ApiKey.objects.select_for_update().get(pk=key_id)
    except ApiKey.DoesNotExist as exc:
        raise AccountNotFound(f"no API key {key_id}") from exc
    if api_key.status == ApiKey.Status.REVOKED:
        return RevokedKey(api_key=api_key, changed=False)
    api_key.status = ApiKey.Status.REVOKED
    api_key.revoked_at = now
    api_key.save(update_fields=["status", "revoked_at"])
    return RevokedKey(api_key=api_key, changed=True)


@transaction.atomic(durable=True)
def api_key_revoke(*, key_id: int, now: datetime) -> ApiKey:
    """Revoke a key in its own transaction (the revoke_api_key command)."""
    return api_key_revoke_locked(key_id=key_id, now=now).api_key
