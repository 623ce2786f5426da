"""The admin for payments: stored provider events with what each caused, checkouts (and
finance's "create a checkout link", confirmed and recorded), auto top-up attempts, and the
alert outbox with its deliveries and attempts. All read-only: rows change through the
services in billing/payments/services.py."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html_join

from billing.admin import ReadOnlyAdmin, memo_required, money_display
from billing.errors import BillingError
from billing.models import (
    Account,
    AutoTopupAttempt,
    Checkout,
    DeliveryAttempt,
    Notification,
    NotificationDelivery,
    PaymentEvent,
)
from billing.money import money_form_field
from billing.payments.providers import PaymentProviderError
from billing.payments.services import (
    PaymentInputError,
    StaffNote,
    alerts_set,
    auto_topup_set,
    checkout_create,
    topup_amount_parse,
)


def _transaction_links(ids: list[int]) -> str:
    if not ids:
        return "—"
    return format_html_join(
        ", ",
        '<a href="{}">#{}</a>',
        ((reverse("admin:billing_ledgertransaction_change", args=[pk]), pk) for pk in ids),
    )


@admin.register(PaymentEvent)
class PaymentEventAdmin(ReadOnlyAdmin):
    list_display = ("event_id", "type", "status", "account", "caused", "received_at", "detail")
    list_filter = ("status", "provider", "type")
    search_fields = ("=event_id", "=payment_intent_id", "=account__id")
    date_hierarchy = "received_at"
    list_select_related = ("account",)
    show_facets = admin.ShowFacets.ALWAYS
    fields = (
        "provider",
        "event_id",
        "type",
        "status",
        "detail",
        "account",
        "caused",
        "payment_intent_id",
        "received_at",
        "applied_at",
        "payload",
    )
    readonly_fields = ("caused",)

    @admin.display(description="caused (ledger transactions)")
    def caused(self, event: PaymentEvent) -> str:
        return _transaction_links(list(event.transaction_ids))


class CheckoutLinkForm(forms.Form):
    account_id = forms.IntegerField(min_value=1)
    amount = forms.CharField(help_text="USD, like 25.00")
    memo = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Why: recorded as a staff action.",
    )
    form_key = forms.CharField(widget=forms.HiddenInput, max_length=64)

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])

    def clean_amount(self) -> Decimal:
        try:
            return topup_amount_parse(self.cleaned_data["amount"])
        except PaymentInputError as exc:
            raise forms.ValidationError(exc.message) from exc

    def clean_account_id(self) -> int:
        account_id = self.cleaned_data["account_id"]
        account = Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER).first()
        if account is None:
            raise forms.ValidationError(f"No customer account {account_id}.")
        if account.status == Account.Status.CLOSED:
            raise forms.ValidationError(f"Account {account_id} is closed.")
        return int(account_id)


@admin.register(Checkout)
class CheckoutAdmin(ReadOnlyAdmin):
    list_display = (
        "session_id",
        "account",
        "amount_display",
        "status",
        "provider",
        "created_by",
        "created_at",
        "completed_at",
        "transaction",
    )
    list_filter = ("status", "provider")
    search_fields = ("=session_id", "=payment_intent_id", "=account__id")
    list_select_related = ("account", "created_by")
    date_hierarchy = "created_at"
    readonly_fields = ("amount_display",)
    exclude = ("amount",)

    @admin.display(description="amount", ordering="amount")
    def amount_display(self, checkout: Checkout) -> str:
        return money_display(checkout.amount)

    def get_urls(self) -> list[URLPattern]:
        return [
            path("link/", self.admin_site.admin_view(self.link_view), name="billing_checkout_link"),
            *super().get_urls(),
        ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {
            **(extra_context or {}),
            "can_link": request.user.has_perm("billing.add_checkout"),
        }
        return super().changelist_view(request, extra_context=context)

    def link_view(self, request: HttpRequest) -> HttpResponse:
        """Create a checkout link for a customer: the form, a confirmation, then the link."""
        if not request.user.has_perm("billing.add_checkout"):
            raise PermissionDenied
        stage = "form"
        checkout = None
        error = ""
        if request.method == "POST":
            form = CheckoutLinkForm(request.POST)
            if form.is_valid():
                stage = "confirm"
                if "confirm" in request.POST:
                    try:
                        checkout = checkout_create(
                            account_id=form.cleaned_data["account_id"],
                            amount=form.cleaned_data["amount"],
                            now=timezone.now(),
                            created_by_id=request.user.pk,
                            staff_memo=form.cleaned_data["memo"],
                            form_key=form.cleaned_data["form_key"],
                        )
                        stage = "done"
                    except (BillingError, PaymentProviderError) as exc:
                        error = str(exc)
        else:
            form = CheckoutLinkForm(
                initial={"form_key": uuid.uuid4().hex, "account_id": request.GET.get("account")}
            )
        account = None
        if stage != "form":
            account = Account.objects.get(pk=form.cleaned_data["account_id"])
        url = request.build_absolute_uri(checkout.url) if checkout is not None else ""
        return TemplateResponse(
            request,
            "admin/billing/payments/checkout_link.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.model._meta,
                "title": "Create a checkout link",
                "form": form,
                "stage": stage,
                "account": account,
                "amount": form.cleaned_data.get("amount") if stage != "form" else None,
                "checkout": checkout,
                "checkout_url": url,
                "error": error,
            },
        )


class AutoTopupForm(forms.Form):
    enabled = forms.BooleanField(required=False)
    auto_topup_threshold = money_form_field(min_value=0, required=False)
    auto_topup_amount = money_form_field(min_value=0, required=False)
    auto_topup_monthly_limit = money_form_field(min_value=0, required=False)
    memo = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Why: recorded as a staff action.",
    )

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])


class AlertsForm(forms.Form):
    low_balance_threshold = money_form_field(min_value=0, required=False)
    webhook_url = forms.URLField(required=False, assume_scheme="https")
    billing_email = forms.EmailField(required=False)
    rotate_webhook_secret = forms.BooleanField(required=False)
    memo = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Why: recorded as a staff action.",
    )

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])


def _settings_view(
    modeladmin: admin.ModelAdmin[Any],
    request: HttpRequest,
    *,
    account_id: int,
    permission: str,
    form_class: type[forms.Form],
    initial: dict[str, Any],
    apply: Any,
    title: str,
) -> HttpResponse:
    """An account's payment settings: the form, a review of the change, then the result,
    recorded as a StaffAction by the service in the same transaction."""
    if not request.user.has_perm(permission):
        raise PermissionDenied
    account = Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER).first()
    if account is None:
        raise Http404("no such customer account")
    stage, result, error = "form", None, ""
    form = form_class(request.POST) if request.method == "POST" else form_class(initial=initial)
    if request.method == "POST" and form.is_valid():
        stage = "confirm"
        if "confirm" in request.POST:
            staff = StaffNote(
                user_id=int(request.user.pk or 0),
                memo=form.cleaned_data["memo"],
                now=timezone.now(),
            )
            try:
                result = apply(account.pk, form.cleaned_data, staff).as_json()
                stage = "done"
            except BillingError as exc:
                error = str(exc)
                stage = "form"
    return TemplateResponse(
        request,
        "admin/billing/payments/settings_form.html",
        {
            **modeladmin.admin_site.each_context(request),
            "opts": modeladmin.model._meta,
            "title": f"{title}: {account}",
            "form": form,
            "stage": stage,
            "account": account,
            "changes": {
                name: value
                for name, value in (form.cleaned_data.items() if stage == "confirm" else [])
                if name != "memo"
            },
            "result": result,
            "error": error,
        },
    )


@admin.register(AutoTopupAttempt)
class AutoTopupAttemptAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "account",
        "amount_display",
        "status",
        "failure_reason",
        "payment_intent_id",
        "transaction",
        "created_at",
        "updated_at",
    )
    list_filter = ("status",)
    search_fields = ("=account__id", "=payment_intent_id")
    list_select_related = ("account",)
    date_hierarchy = "created_at"
    show_facets = admin.ShowFacets.ALWAYS
    readonly_fields = ("amount_display",)
    exclude = ("amount",)

    @admin.display(description="amount", ordering="amount")
    def amount_display(self, attempt: AutoTopupAttempt) -> str:
        return money_display(attempt.amount)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "settings/<int:account_id>/",
                self.admin_site.admin_view(self.settings_view),
                name="billing_account_auto_topup",
            ),
            *super().get_urls(),
        ]

    def settings_view(self, request: HttpRequest, account_id: int) -> HttpResponse:
        account = Account.objects.filter(pk=account_id).first()
        initial = (
            {}
            if account is None
            else {
                "enabled": account.auto_topup_enabled,
                "auto_topup_threshold": account.auto_topup_threshold,
                "auto_topup_amount": account.auto_topup_amount,
                "auto_topup_monthly_limit": account.auto_topup_monthly_limit,
            }
        )
        return _settings_view(
            self,
            request,
            account_id=account_id,
            permission="billing.set_auto_topup",
            form_class=AutoTopupForm,
            initial=initial,
            title="Auto top-up",
            apply=lambda pk, data, staff: auto_topup_set(
                account_id=pk,
                enabled=data["enabled"],
                threshold=data["auto_topup_threshold"],
                amount=data["auto_topup_amount"],
                monthly_limit=data["auto_topup_monthly_limit"],
                staff=staff,
            ),
        )


class ReadOnlyInline(admin.TabularInline):
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class DeliveryInline(ReadOnlyInline):
    model = NotificationDelivery
    extra = 0
    can_delete = False
    show_change_link = True
    fields = (
        "channel",
        "target",
        "status",
        "attempts",
        "next_attempt_at",
        "delivered_at",
        "last_error",
    )
    readonly_fields = fields


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    list_display = ("id", "type", "account", "created_at", "dispatched_at", "delivery_states")
    list_filter = ("type",)
    search_fields = ("=account__id",)
    list_select_related = ("account",)
    date_hierarchy = "created_at"
    inlines = [DeliveryInline]

    @admin.display(description="deliveries")
    def delivery_states(self, notification: Notification) -> str:
        return (
            ", ".join(
                f"{d.channel}: {d.status} ({d.attempts})" for d in notification.deliveries.all()
            )
            or "—"
        )

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).prefetch_related("deliveries")

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "alerts/<int:account_id>/",
                self.admin_site.admin_view(self.alerts_view),
                name="billing_account_alerts",
            ),
            *super().get_urls(),
        ]

    def alerts_view(self, request: HttpRequest, account_id: int) -> HttpResponse:
        account = Account.objects.filter(pk=account_id).first()
        initial = (
            {}
            if account is None
            else {
                "low_balance_threshold": account.low_balance_threshold,
                "webhook_url": account.webhook_url,
                "billing_email": account.billing_email,
            }
        )
        return _settings_view(
            self,
            request,
            account_id=account_id,
            permission="billing.set_alerts",
            form_class=AlertsForm,
            initial=initial,
            title="Balance alerts",
            apply=lambda pk, data, staff: alerts_set(
                account_id=pk,
                low_balance_threshold=data["low_balance_threshold"],
                webhook_url=data["webhook_url"],
                billing_email=data["billing_email"],
                rotate_secret=data["rotate_webhook_secret"],
                staff=staff,
            ),
        )


class AttemptInline(ReadOnlyInline):
    model = DeliveryAttempt
    extra = 0
    can_delete = False
    fields = ("attempted_at", "ok", "status_code", "error")
    readonly_fields = fields


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "notification",
        "channel",
        "target",
        "status",
        "attempts",
        "next_attempt_at",
        "delivered_at",
        "last_error",
    )
    list_filter = ("status", "channel")
    search_fields = ("=notification__account__id", "target")
    list_select_related = ("notification",)
    inlines = [AttemptInline]
