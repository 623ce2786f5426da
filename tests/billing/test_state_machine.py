"""A Hypothesis state machine drives the real services against a plain-Python model of one
customer account and checks the database against the model after every step.

Ledger rows cannot be deleted (triggers), so examples do not clean up: each one opens a fresh
account and compares only what it created, plus the global invariants that hold for every
account at once (legs sum to zero, audit clean).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db.models import Sum
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from billing.errors import HoldAlreadyResolved, IdempotencyConflict, InsufficientFunds
from billing.models import Account, ApiKey, Hold, LedgerLeg, LedgerTransaction
from billing.money import ZERO, money_round
from billing.selectors import ledger_audit, system_balances
from billing.services.accounts import credit_post
from billing.services.holds import hold_place, hold_release, hold_settle, holds_expire
from billing.services.ledger import request_idempotency_key
from tests.factories import make_account, make_key

D = Decimal
START = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

# Whole cents keep shrunk examples readable; the services see them as exact Decimals.
cents = st.integers(min_value=1, max_value=2_000).map(lambda c: D(c).scaleb(-2))
SETTLE_FACTORS = {"zero": D(0), "under": D("0.3"), "exact": D(1), "over": D("1.7")}


@dataclass
class ModelHold:
    amount: Decimal
    expires_at: datetime
    state: str = Hold.State.ACTIVE
    settled_amount: Decimal | None = None
    is_late: bool = False
    is_overrun: bool = False


class LedgerMachine(RuleBasedStateMachine):
    grants = Bundle("grants")
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.clock = START
        self.balance = ZERO
        self.overdraft = ZERO
        self.revenue = ZERO
        self.granted: dict[str, tuple[Decimal, int]] = {}  # idempotency key -> (amount, txn id)
        self.model_holds: dict[str, ModelHold] = {}
        self.flagged = False  # an overrun or late settle may legitimately pass the overdraft
        self.run = uuid.uuid4().hex[:12]
        self.account: Account
        self.key: ApiKey

    # --- model helpers ---------------------------------------------------------------------

    @property
    def held(self) -> Decimal:
        return sum(
            (hold.amount for hold in self.model_holds.values() if hold.state == Hold.State.ACTIVE),
            ZERO,
        )

    # --- rules -----------------------------------------------------------------------------

    @initialize(credits=st.integers(0, 50).map(D), overdraft=st.sampled_from([D(0), D(0), D(5)]))
    def open_account(self, credits: Decimal, overdraft: Decimal) -> None:
        self.account = make_account(credits=credits, overdraft=overdraft, now=self.clock)
        self.key = make_key(account=self.account, now=self.clock).api_key
        self.balance = credits
        self.overdraft = overdraft

    @rule(target=grants, amount=cents)
    def grant(self, amount: Decimal) -> str:
        key = f"{self.run}-grant-{len(self.granted)}"
        txn, replayed = credit_post(
            kind="grant",
            account_id=self.account.pk,
            amount=amount,
            memo="model grant",
            idempotency_key=key,
            now=self.clock,
        )
        assert not replayed
        self.granted[key] = (amount, txn.pk)
        self.balance += amount
        return key

    @rule(key=grants)
    def replay_grant_same_content(self, key: str) -> None:
        amount, txn_id = self.granted[key]
        txn, replayed = credit_post(
            kind="grant",
            account_id=self.account.pk,
            amount=amount,
            memo="retried",
            idempotency_key=key,
            now=self.clock,
        )
        assert replayed and txn.pk == txn_id

    @rule(key=grants, delta=cents)
    def replay_grant_other_content(self, key: str, delta: Decimal) -> None:
        amount, _ = self.granted[key]
        with pytest.raises(IdempotencyConflict):
            credit_post(
                kind="grant",
                account_id=self.account.pk,
                amount=amount + delta,
                memo="conflict",
                idempotency_key=key,
                now=self.clock,
            )

    @rule(target=holds, amount=cents, ttl=st.sampled_from([60, 300, 900]))
    def place(self, amount: Decimal, ttl: int) -> object:
        request_id = f"{self.run}-hold-{len(self.model_holds)}"
        affordable = self.balance - self.held - amount >= -self.overdraft
        try:
            hold_place(
                api_key=self.key,
                request_id=request_id,
                amount=amount,
                now=self.clock,
                ttl_seconds=ttl,
            )
        except InsufficientFunds:
            assert not affordable
            return multiple()
        assert affordable
        self.model_holds[request_id] = ModelHold(
            amount=amount, expires_at=self.clock + timedelta(seconds=ttl)
        )
        return request_id

    @rule(request_id=holds)
    def replay_place_same_content(self, request_id: str) -> None:
        hold = hold_place(
            api_key=self.key,
            request_id=request_id,
            amount=self.model_holds[request_id].amount,
            now=self.clock,
        )
        assert hold.request_id == request_id

    @rule(request_id=holds, delta=cents)
    def replay_place_other_content(self, request_id: str, delta: Decimal) -> None:
        with pytest.raises(IdempotencyConflict):
            hold_place(
                api_key=self.key,
                request_id=request_id,
                amount=self.model_holds[request_id].amount + delta,
                now=self.clock,
            )

    @rule(request_id=holds, how=st.sampled_from(sorted(SETTLE_FACTORS)))
    def settle(self, request_id: str, how: str) -> None:
        hold = self.model_holds[request_id]
        cost = money_round(hold.amount * SETTLE_FACTORS[how])
        if hold.state == Hold.State.RELEASED:
            with pytest.raises(HoldAlreadyResolved):
                hold_settle(request_id=request_id, cost=cost, now=self.clock)
            return
        if hold.settled_amount is not None:
            if cost == hold.settled_amount:
                assert hold_settle(request_id=request_id, cost=cost, now=self.clock).replayed
            else:
                with pytest.raises(IdempotencyConflict):
                    hold_settle(request_id=request_id, cost=cost, now=self.clock)
            return
        result = hold_settle(request_id=request_id, cost=cost, now=self.clock)
        assert not result.replayed
        hold.is_late = hold.state == Hold.State.EXPIRED or self.clock >= hold.expires_at
        hold.is_overrun = cost > hold.amount
        if hold.state == Hold.State.ACTIVE:
            hold.state = Hold.State.SETTLED
        hold.settled_amount = cost
        self.balance -= cost
        self.revenue += cost
        self.flagged = self.flagged or hold.is_late or hold.is_overrun
        assert (result.is_late, result.is_overrun) == (hold.is_late, hold.is_overrun)

    @rule(request_id=holds)
    def release(self, request_id: str) -> None:
        hold = self.model_holds[request_id]
        if hold.state in (Hold.State.ACTIVE, Hold.State.RELEASED):
            assert hold_release(request_id=request_id, now=self.clock).state == Hold.State.RELEASED
            hold.state = Hold.State.RELEASED
        else:
            with pytest.raises(HoldAlreadyResolved):
                hold_release(request_id=request_id, now=self.clock)

    @rule(seconds=st.sampled_from([1, 59, 60, 299, 300, 900, 3600]))
    def advance_clock(self, seconds: int) -> None:
        self.clock += timedelta(seconds=seconds)

    @rule()
    def expire(self) -> None:
        # The sweeper is global; holds of earlier examples may expire too, so count only ours.
        holds_expire(now=self.clock)
        for hold in self.model_holds.values():
            if hold.state == Hold.State.ACTIVE and hold.expires_at <= self.clock:
                hold.state = Hold.State.EXPIRED

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def balances_match_the_model(self) -> None:
        if not hasattr(self, "account"):
            return
        self.account.refresh_from_db()
        assert (self.account.balance, self.account.held) == (self.balance, self.held)

    @invariant()
    def available_never_below_overdraft_unless_flagged(self) -> None:
        if not hasattr(self, "account") or self.flagged:
            return
        assert self.account.balance - self.account.held >= -self.account.overdraft

    @invariant()
    def money_is_conserved(self) -> None:
        assert LedgerLeg.objects.aggregate(total=Sum("amount"))["total"] in (None, ZERO)
        customers = (
            Account.objects.filter(kind=Account.Kind.CUSTOMER).aggregate(total=Sum("balance"))[
                "total"
            ]
            or ZERO
        )
        assert customers + sum(system_balances().values(), ZERO) == 0
        if hasattr(self, "account"):
            # This account's usage went to revenue, cent for cent.
            usage = (
                LedgerLeg.objects.filter(
                    account_id=self.account.pk, transaction__kind=LedgerTransaction.Kind.USAGE
                ).aggregate(total=Sum("amount"))["total"]
                or ZERO
            )
            assert -usage == self.revenue

    @invariant()
    def holds_match_the_model_and_resolve_once(self) -> None:
        if not self.model_holds:
            return
        rows = {
            hold.request_id: hold
            for hold in Hold.objects.filter(request_id__in=list(self.model_holds))
        }
        assert rows.keys() == self.model_holds.keys()
        for request_id, expected in self.model_holds.items():
            row = rows[request_id]
            assert (row.state, row.settled_amount, row.is_late, row.is_overrun) == (
                expected.state,
                expected.settled_amount,
                expected.is_late,
                expected.is_overrun,
            ), request_id
            assert (row.resolved_at is None) == (row.state == Hold.State.ACTIVE)
        postings = LedgerTransaction.objects.filter(
            idempotency_key__in=[request_idempotency_key(rid) for rid in self.model_holds]
        ).values_list("request_id", flat=True)
        charged = list(postings)
        assert len(charged) == len(set(charged))  # at most one posting per request
        assert set(charged) == {
            rid for rid, hold in self.model_holds.items() if hold.settled_amount
        }

    @invariant()
    def cached_balances_equal_the_ledger(self) -> None:
        report = ledger_audit()
        assert report.clean, report.as_json()


@pytest.mark.django_db(transaction=True)
def test_ledger_state_machine() -> None:
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,  # the same examples on every CI run
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
