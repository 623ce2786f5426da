"""Corrections are reversing entries: the original stays, its mirror image is posted once."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import IntegrityError

from billing.models import LedgerLeg, LedgerTransaction
from billing.selectors import ledger_audit
from billing.services.accounts import credit_post
from billing.services.ledger import transaction_reverse
from tests.factories import make_account

pytestmark = pytest.mark.django_db


def test_reversal_mirrors_the_original_and_restores_the_balance(now):
    account = make_account(credits=Decimal("10"), now=now)
    grant, _ = credit_post(
        kind="grant",
        account_id=account.pk,
        amount=Decimal("2.5"),
        memo="promo",
        idempotency_key="promo-1",
        now=now,
    )
    reversal, replayed = transaction_reverse(
        transaction_id=grant.pk, memo="granted twice", idempotency_key="reverse-promo-1", now=now
    )
    account.refresh_from_db()
    assert replayed is False
    assert reversal.kind == LedgerTransaction.Kind.REVERSAL
    assert reversal.reverses_id == grant.pk
    assert account.balance == Decimal("10")
    original = {leg.account_id: leg.amount for leg in LedgerLeg.objects.filter(transaction=grant)}
    mirror = {leg.account_id: leg.amount for leg in LedgerLeg.objects.filter(transaction=reversal)}
    assert mirror == {account_id: -amount for account_id, amount in original.items()}
    assert LedgerTransaction.objects.filter(pk=grant.pk).exists()  # the original is untouched
    assert ledger_audit().clean


def test_reversal_replay_returns_the_original_reversal(now):
    account = make_account(credits=Decimal("10"), now=now)
    grant, _ = credit_post(
        kind="grant",
        account_id=account.pk,
        amount=Decimal("1"),
        memo="promo",
        idempotency_key="promo-2",
        now=now,
    )
    first, _ = transaction_reverse(
        transaction_id=grant.pk, memo="x", idempotency_key="rev-2", now=now
    )
    again, replayed = transaction_reverse(
        transaction_id=grant.pk, memo="y", idempotency_key="rev-2", now=now
    )
    account.refresh_from_db()
    assert replayed is True and again.pk == first.pk
    assert account.balance == Decimal("10")


def test_a_transaction_is_reversed_at_most_once(now):
    account = make_account(credits=Decimal("10"), now=now)
    grant, _ = credit_post(
        kind="grant",
        account_id=account.pk,
        amount=Decimal("1"),
        memo="promo",
        idempotency_key="promo-3",
        now=now,
    )
    transaction_reverse(transaction_id=grant.pk, memo="x", idempotency_key="rev-3a", now=now)
    # Transaction.reverses is one-to-one: the database refuses a second reversal.
    with pytest.raises(IntegrityError, match="reverses"):
        transaction_reverse(transaction_id=grant.pk, memo="x", idempotency_key="rev-3b", now=now)
    account.refresh_from_db()
    assert account.balance == Decimal("10")
