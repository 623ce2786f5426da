"""API keys: issued once in clear, stored as a SHA-256 digest."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import transaction

from billing.errors import AccountNotFound, InvalidAmount
from billing.models import Account, ApiKey
from billing.services.budgets import api_key_budget_check

KEY_PREFIX = "sk-gw-"
DISPLAY_PREFIX_LENGTH = 14  # "sk-gw-" plus 8 random characters


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str  # shown once, never stored


def api_key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_issue(
    *,
    account_id: int,
    now: datetime,
    name: str = "",
    purpose: str = ApiKey.Purpose.REALTIME,
    completion_window: str = "",
    budget_limit: Decimal | None = None,
    budget_period: str = "",
    expires_at: datetime | None = None,
) -> IssuedKey:
    if purpose not in ApiKey.Purpose.values:
        raise InvalidAmount(f"unknown purpose {purpose!r}")
    api_key_budget_check(budget_limit=budget_limit, budget_period=budget_period)
    if expires_at is not None and expires_at <= now:
        raise InvalidAmount("the expiry is in the past")
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
            completion_window=completion_window,
            budget_limit=budget_limit,
            budget_period=budget_period,
            expires_at=expires_at,
        )
    return IssuedKey(api_key=api_key, secret=secret)


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
