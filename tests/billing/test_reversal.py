"""Corrections are reversing entries: the original stays, its mirror image is posted once."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.errors import TransactionAlreadyReversed
from billing.models import LedgerLeg, LedgerTransaction
from billing.selectors import ledger_audit
from billing.services.accounts import credit_post
from billing.services.ledger import transaction_reverse
from tests.factories import make_account

pytestmark = pytest.mark.django_db


def _grant(account_id: int, amount: str, key: str, now):  # type: ignore[no-untyped-def]
    posted = credit_post(
        kind="grant",
        account_id=account_id,
        amount=Decimal(amount),
        memo="promo",
        idempotency_key=key,
        now=now,
    )
    assert not posted.replayed
    return LedgerTransaction.objects.get(pk=posted.transaction_id)


def test_reversal_mirrors_the_original_and_restores_the_balance(now):
    account = make_account(credits=Decimal("10"), now=now)
    grant = _grant(account.pk, "2.5", "promo-1", now)
    posted = transaction_reverse(
        transaction_id=grant.pk, memo="granted twice", idempotency_key="reverse-promo-1", now=now
    )
    account.refresh_from_db()
    assert posted.replayed is False
    reversal = LedgerTransaction.objects.get(pk=posted.transaction_id)
    assert reversal.kind == LedgerTransaction.Kind.REVERSAL
    assert reversal.reverses_id == grant.pk
    assert (reversal.memo, reversal.idempotency_key) == ("granted twice", "reverse-promo-1")
    assert account.balance == Decimal("10")
    original = {leg.account_id: leg.amount for leg in LedgerLeg.objects.filter(transaction=grant)}
    mirror = {leg.account_id: leg.amount for leg in LedgerLeg.objects.filter(transaction=reversal)}
    assert mirror == {account_id: -amount for account_id, amount in original.items()}
    assert LedgerTransaction.objects.filter(pk=grant.pk).exists()  # the original is untouched
    assert ledger_audit().clean


def test_reversal_replay_returns_the_original_reversal(now):
    account = make_account(credits=Decimal("10"), now=now)
    grant = _grant(account.pk, "1", "promo-2", now)
    first = transaction_reverse(
        transaction_id=grant.pk, memo="x", idempotency_key="rev-2", now=now
    )
    # The memo may differ: the content (the mirrored legs) is what identifies a replay.
    again = transaction_reverse(
        transaction_id=grant.pk, memo="y", idempotency_key="rev-2", now=now
    )
    account.refresh_from_db()
    assert (first.replayed, again.replayed) == (False, True)
    assert again.transaction_id == first.transaction_id
    assert LedgerTransaction.objects.filter(reverses_id=grant.pk).count() == 1
    assert LedgerTransaction.objects.get(pk=first.transaction_id).memo == "x"
    assert account.balance == Decimal("10")
    assert ledger_audit().clean


def test_a_transaction_is_reversed_at_most_once(now):
    account = make_account(credits=Decimal("10"), now=now)
    grant = _grant(account.pk, "1", "promo-3", now)
    first = transaction_reverse(
        transaction_id=grant.pk, memo="x", idempotency_key="rev-3a", now=now
    )
    before = LedgerTransaction.objects.count()
    # Transaction.reverses is one-to-one: a second reversal under another key is refused, and
    # writes nothing.
    with pytest.raises(TransactionAlreadyReversed):
        transaction_reverse(transaction_id=grant.pk, memo="x", idempotency_key="rev-3b", now=now)
    assert LedgerTransaction.objects.count() == before
    assert not LedgerTransaction.objects.filter(idempotency_key="rev-3b").exists()
    assert list(
        LedgerTransaction.objects.filter(reverses_id=grant.pk).values_list("pk", flat=True)
    ) == [first.transaction_id]
    account.refresh_from_db()
    assert account.balance == Decimal("10")
    assert ledger_audit().clean
