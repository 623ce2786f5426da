"""The payment endpoints' bodies as the OpenAPI schema shows them (GET /v1/openapi.json).
The views validate with the services (billing/payments/services.py), which name the
parameter in a 400; amounts are decimal strings both ways."""

from __future__ import annotations

from rest_framework import serializers

CENTS_PATTERN = r"^[0-9]{1,5}(\.[0-9]{1,2})?$"  # a top-up: whole cents
AMOUNT_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,10})?$"  # a threshold or limit: the stored precision


class CheckoutRequestSerializer(serializers.Serializer):
    amount = serializers.RegexField(
        CENTS_PATTERN, help_text='USD, within PAYMENTS_MIN_TOPUP..MAX ("25.00").'
    )
    success_url = serializers.URLField(required=False)
    cancel_url = serializers.URLField(required=False)


class CheckoutSerializer(serializers.Serializer):
    checkout_id = serializers.CharField(help_text="The provider's session id (cs_… for Stripe).")
    url = serializers.CharField(help_text="Where the customer pays.")
    amount = serializers.CharField()


class AutoTopupRequestSerializer(serializers.Serializer):
    enabled = serializers.BooleanField(required=False, default=True)
    auto_topup_threshold = serializers.RegexField(AMOUNT_PATTERN, required=False, allow_null=True)
    auto_topup_amount = serializers.RegexField(CENTS_PATTERN, required=False, allow_null=True)
    auto_topup_monthly_limit = serializers.RegexField(
        AMOUNT_PATTERN, required=False, allow_null=True
    )


class AutoTopupSerializer(serializers.Serializer):
    enabled = serializers.BooleanField()
    auto_topup_threshold = serializers.CharField(allow_null=True)
    auto_topup_amount = serializers.CharField(allow_null=True)
    auto_topup_monthly_limit = serializers.CharField(allow_null=True)


class AlertsRequestSerializer(serializers.Serializer):
    low_balance_threshold = serializers.RegexField(AMOUNT_PATTERN, required=False, allow_null=True)
    webhook_url = serializers.CharField(required=False, allow_blank=True)
    billing_email = serializers.CharField(required=False, allow_blank=True)
    rotate_webhook_secret = serializers.BooleanField(required=False, default=False)


class AlertsSerializer(serializers.Serializer):
    low_balance_threshold = serializers.CharField(allow_null=True)
    webhook_url = serializers.CharField()
    billing_email = serializers.CharField()
    webhook_secret = serializers.CharField(
        allow_null=True, help_text="whsec_…: only when a new one was made; shown once."
    )
