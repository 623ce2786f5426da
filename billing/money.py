"""The one place that knows how money is represented, rounded and printed.

Amounts are `Decimal` USD in Python and whole units of 1e-10 USD (`bigint`) in the database,
so arithmetic is exact in PostgreSQL and in Python alike. Rounding happens only in
`money_round` (half-even, to 10 places); storing an amount that is not already exact at that
precision is an error, never a silent rounding.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from django.core import exceptions
from django.db import models
from django.db.models import Value
from django.db.models.expressions import Combinable, register_combinable_fields

MONEY_PLACES = 10
QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)  # 1E-10
UNITS_PER_USD = 10**MONEY_PLACES
MILLION = Decimal(1_000_000)
ZERO = Decimal(0).quantize(QUANTUM)

# Largest amount a bigint can hold (~922 million USD per value).
MAX_UNITS = 2**63 - 1


class MoneyError(ValueError):
    """An amount that is not a finite decimal, or too precise to store exactly."""


def money_round(amount: Decimal) -> Decimal:
    """Round to the stored precision, half-even. The only rounding in the platform."""
    return amount.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


def money_parse(raw: str | int | Decimal) -> Decimal:
    """Parse user input (a command argument, an admin form) into an exact amount."""
    try:
        amount = Decimal(str(raw).strip())
    except InvalidOperation as exc:
        raise MoneyError(f"not a decimal amount: {raw!r}") from exc
    if not amount.is_finite():
        raise MoneyError(f"not a finite amount: {raw!r}")
    try:
        exact = money_round(amount)
    except InvalidOperation as exc:
        # quantize() refuses results longer than the context precision (huge amounts).
        raise MoneyError(f"out of range: {raw!r}") from exc
    if amount != exact:
        raise MoneyError(f"more than {MONEY_PLACES} decimal places: {raw!r}")
    if abs(exact.scaleb(MONEY_PLACES)) > MAX_UNITS:
        raise MoneyError(f"out of range: {raw!r}")
    return exact


def to_units(amount: Decimal) -> int:
    exact = money_round(amount)
    if exact != amount:
        raise MoneyError(f"{amount} is not exact at {MONEY_PLACES} places; round it first")
    units = int(exact.scaleb(MONEY_PLACES))
    if abs(units) > MAX_UNITS:
        raise MoneyError(f"{amount} is out of range")
    return units


def from_units(units: int | Decimal) -> Decimal:
    return Decimal(units).scaleb(-MONEY_PLACES).quantize(QUANTUM)


def money_str(amount: Decimal) -> str:
    """The wire format: a plain decimal string with all stored places, never exponent form."""
    return format(money_round(amount), "f")


# The largest amount one value can hold, a balance included: 922337203.6854775807 USD (and its
# negative the smallest). Anything beyond is refused before it reaches the database.
MAX_AMOUNT = from_units(MAX_UNITS)


def balance_after(balance: Decimal, amount: Decimal) -> Decimal:
    """`balance + amount`, or MoneyError when the database could not store that balance (the
    engine's UPDATE would fail with bigint out of range)."""
    after = balance + amount
    if after > MAX_AMOUNT:
        raise MoneyError(
            f"the balance would be {money_str(after)} USD, more than the largest amount "
            f"that can be stored ({money_str(MAX_AMOUNT)} USD)"
        )
    if after < -MAX_AMOUNT:
        raise MoneyError(
            f"the balance would be {money_str(after)} USD, less than the smallest amount "
            f"that can be stored ({money_str(-MAX_AMOUNT)} USD)"
        )
    return after


def money_form_field(**kwargs: Any) -> Any:
    """A form field for an amount: exact at the stored precision and within what the database
    holds, so an amount beyond it is the form's error rather than a MoneyError (a 500)."""
    from django import forms

    defaults: dict[str, Any] = {
        "decimal_places": MONEY_PLACES,
        "max_value": MAX_AMOUNT,
        "min_value": -MAX_AMOUNT,
    }
    return forms.DecimalField(**{**defaults, **kwargs})


class MoneyField(models.Field):
    """USD amount stored as bigint units of 1e-10.

    Deliberately not an IntegerField subclass: mixing it with a bare Decimal in an F()
    expression raises FieldError instead of silently adding USD to units. Wrap parameters
    with `money_value()`.
    """

    description = "Exact USD amount (bigint units of 1e-10 USD)"

    def get_internal_type(self) -> str:
        return "BigIntegerField"

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Decimal | None:
        return None if value is None else from_units(value)

    def to_python(self, value: Any) -> Decimal | None:
        if value is None or isinstance(value, Decimal):
            return value
        try:
            return money_parse(value)
        except MoneyError as exc:
            raise exceptions.ValidationError(str(exc), code="invalid") from exc

    def get_prep_value(self, value: Any) -> int | None:
        value = super().get_prep_value(value)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = Decimal(value)
        if not isinstance(value, Decimal):
            value = money_parse(value)
        return to_units(value)

    def formfield(self, **kwargs: Any) -> Any:
        from django import forms

        defaults: dict[str, Any] = {
            "form_class": forms.DecimalField,
            "decimal_places": MONEY_PLACES,
            "max_value": MAX_AMOUNT,
            "min_value": -MAX_AMOUNT,
        }
        return super().formfield(**{**defaults, **kwargs})


for _connector in (Combinable.ADD, Combinable.SUB):
    register_combinable_fields(MoneyField, _connector, MoneyField, MoneyField)


def money_value(amount: Decimal) -> Value:
    """An amount as an SQL parameter of the right type, for F() arithmetic."""
    return Value(amount, output_field=MoneyField())
