"""Typed domain errors. The gateway maps them to HTTP in one place (gateway/errors.py)."""

from __future__ import annotations

from decimal import Decimal


class BillingError(Exception):
    """Base of every refusal the money core can give."""


class AccountNotFound(BillingError):
    pass


class AccountInactive(BillingError):
    def __init__(self, *, account_id: int, status: str) -> None:
        super().__init__(f"account {account_id} is {status}")
        self.account_id = account_id
        self.status = status


class ApiKeyInactive(BillingError):
    """The key was revoked or expired (checked by the hold itself, in the same statement)."""

    def __init__(self, *, api_key_id: int, reason: str) -> None:
        super().__init__(f"API key {api_key_id} is {reason}")
        self.api_key_id = api_key_id
        self.reason = reason


class InsufficientFunds(BillingError):
    def __init__(self, *, account_id: int, amount: Decimal) -> None:
        super().__init__(f"account {account_id} cannot cover {amount} USD")
        self.account_id = account_id
        self.amount = amount


class BudgetExceeded(BillingError):
    def __init__(self, *, api_key_id: int, amount: Decimal) -> None:
        super().__init__(f"key {api_key_id} budget cannot cover {amount} USD")
        self.api_key_id = api_key_id
        self.amount = amount


class IdempotencyConflict(BillingError):
    """The same idempotency key was used with different content. For a settle, `charged` is
    what the request's posting took from the customer."""

    def __init__(self, message: str, *, charged: Decimal | None = None) -> None:
        super().__init__(message)
        self.charged = charged


class HoldNotFound(BillingError):
    pass


class HoldAlreadyResolved(BillingError):
    """The hold (or its request's one posting) was already resolved another way."""

    def __init__(self, *, request_id: str, state: str, charged: Decimal | None = None) -> None:
        super().__init__(f"hold {request_id} is already {state}")
        self.request_id = request_id
        self.state = state
        # What the request's posting took from the customer (for a refused settle).
        self.charged = charged


class UnbalancedTransaction(BillingError):
    pass


class TransactionAlreadyReversed(BillingError):
    """A transaction is reversed at most once (the database keeps one reversal per posting)."""


class InvalidAmount(BillingError):
    pass


class ApiKeyNotFound(AccountNotFound):
    """No such key (in the account asked about)."""


class InvalidKeyField(InvalidAmount):
    """An API key setting that cannot be stored; `field` names the service's argument."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class ModelNotPriced(BillingError):
    def __init__(self, *, model_alias: str) -> None:
        super().__init__(f"model {model_alias!r} has no tariff")
        self.model_alias = model_alias


class RefundExceedsPaid(BillingError):
    """A refund returns at most what the account was charged or paid, net of earlier refunds
    (billing_engine.account_refundable); a larger correction is an adjustment."""

    def __init__(self, *, refundable: Decimal) -> None:
        super().__init__(
            f"a refund can return at most {refundable:f} USD (usage charged plus purchases, "
            "less earlier refunds); a larger correction is an adjustment"
        )
        self.refundable = refundable
