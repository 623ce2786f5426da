"""The self-service API's bodies (billing/views.py): what a client may send to manage the
account's keys, validated here with a 400 naming the parameter, and what it gets back. Money
is a decimal string both ways (billing/money.py); a key's secret only in the answer to its
issue, never its hash."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from billing.models import ApiKey
from billing.money import MoneyError, money_parse, money_str
from billing.services.keys import MAX_RATE_LIMIT


@extend_schema_field(OpenApiTypes.STR)
class MoneyString(serializers.Field):
    """An amount in USD as a decimal string ("20", "0.5"); a JSON number is read by its
    digits, and more than 10 decimal places is refused, never rounded."""

    default_error_messages = {"invalid": 'Must be a decimal amount in USD, like "20.00".'}

    def to_representation(self, value: Decimal) -> str:
        return money_str(value)

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool) or not isinstance(data, str | int | float):
            self.fail("invalid")
        try:
            amount = money_parse(str(data))
        except MoneyError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        if amount < 0:
            raise serializers.ValidationError("Must not be negative.")
        return amount


def _rate_limit(what: str) -> serializers.IntegerField:
    return serializers.IntegerField(
        min_value=1,
        max_value=MAX_RATE_LIMIT,
        allow_null=True,
        required=False,
        help_text=f"{what} in any 60 s (null: no limit).",
    )


class _Strict(serializers.Serializer):
    """A body of only the declared fields: anything else is a 400 naming it."""

    unchangeable: tuple[str, ...] = ()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.initial_data, dict):
            for name in self.initial_data:
                if name in self.unchangeable:
                    raise serializers.ValidationError({name: f"'{name}' cannot be changed."})
                if name not in self.fields:
                    raise serializers.ValidationError({name: f"Unrecognized parameter '{name}'."})
        return attrs


class ApiKeyCreateSerializer(_Strict):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    purpose = serializers.ChoiceField(
        choices=ApiKey.Purpose.choices,
        default=ApiKey.Purpose.REALTIME,
        help_text="Which tariffs price the key's requests.",
    )
    scope = serializers.ChoiceField(
        choices=ApiKey.Scope.choices,
        default=ApiKey.Scope.INFERENCE,
        help_text="inference: completions and /v1/billing/ reads; admin: also /v1/keys.",
    )
    budget = MoneyString(
        required=False, allow_null=True, help_text="Spend limit per budget_period, USD."
    )
    budget_period = serializers.ChoiceField(
        choices=ApiKey.BudgetPeriod.choices, required=False, allow_null=True
    )
    rpm = _rate_limit("Requests")
    tpm = _rate_limit("Billed tokens (input plus output)")
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class ApiKeyUpdateSerializer(_Strict):
    """PATCH: only the fields sent change; null removes a budget or a limit."""

    unchangeable = ("purpose", "scope", "expires_at", "status")

    name = serializers.CharField(max_length=200, required=False, allow_blank=True)
    budget = MoneyString(required=False, allow_null=True)
    budget_period = serializers.ChoiceField(
        choices=ApiKey.BudgetPeriod.choices, required=False, allow_null=True
    )
    rpm = _rate_limit("Requests")
    tpm = _rate_limit("Billed tokens (input plus output)")


def _money_or_none(value: Decimal | None) -> str | None:
    return None if value is None else money_str(value)


class ApiKeySerializer(serializers.Serializer):
    """A key as the account sees it (account_keys' annotation gives `period_spent`)."""

    id = serializers.IntegerField(source="pk")
    prefix = serializers.CharField(help_text="The secret's first characters, to recognise it.")
    name = serializers.CharField(allow_blank=True)
    purpose = serializers.CharField()
    scope = serializers.CharField()
    status = serializers.CharField()
    budget = serializers.SerializerMethodField()
    budget_period = serializers.SerializerMethodField()
    spent = serializers.SerializerMethodField()
    held = serializers.SerializerMethodField()
    rpm = serializers.IntegerField(allow_null=True)
    tpm = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)

    @extend_schema_field({"type": "string", "nullable": True, "description": "USD per period."})
    def get_budget(self, key: ApiKey) -> str | None:
        return _money_or_none(key.budget_limit)

    @extend_schema_field(
        {"type": "string", "nullable": True, "description": "day, week or month (UTC)."}
    )
    def get_budget_period(self, key: ApiKey) -> str | None:
        return key.budget_period or None

    @extend_schema_field(
        {
            "type": "string",
            "nullable": True,
            "description": "Settled in the budget's current period, USD (null: no budget).",
        }
    )
    def get_spent(self, key: Any) -> str | None:
        return None if key.budget_limit is None else money_str(key.period_spent)

    @extend_schema_field(
        {
            "type": "string",
            "nullable": True,
            "description": "Held under the budget by requests in progress, USD (null: no budget).",
        }
    )
    def get_held(self, key: ApiKey) -> str | None:
        return None if key.budget_limit is None else money_str(key.budget_held)


class ApiKeyListSerializer(serializers.Serializer):
    object = serializers.CharField(help_text='"list"')
    data = ApiKeySerializer(many=True)  # type: ignore[assignment]


class IssuedApiKeySerializer(ApiKeySerializer):
    api_key = serializers.CharField(help_text="The secret: shown in this answer only.")


class RequestSerializer(serializers.Serializer):
    """One request of the account (its usage record), from account_requests' dicts. The CSV
    export's columns are these fields, in this order. (What the provider charged us is
    finance's, never the customer's: it is not here.)"""

    request_id = serializers.CharField()
    started_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField(help_text="When the request was billed.")
    key_prefix = serializers.CharField(allow_null=True)
    model = serializers.CharField()
    endpoint = serializers.CharField()
    stream = serializers.BooleanField()
    input_tokens = serializers.IntegerField()
    cached_input_tokens = serializers.IntegerField()
    cache_write_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    reasoning_tokens = serializers.IntegerField()
    estimated = serializers.BooleanField(help_text="Usage counted by the gateway, not reported.")
    cost = MoneyString(help_text="Charged, USD.")
    outcome = serializers.CharField(allow_blank=True)


class RequestPageSerializer(serializers.Serializer):
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = RequestSerializer(many=True)
