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
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

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
from billing.payments.providers import PaymentProviderError
from billing.payments.services import PaymentInputError, checkout_create, topup_amount_parse


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


def checkout_link_button(account: Account) -> str:
    url = reverse("admin:billing_checkout_link") + f"?account={account.pk}"
    return format_html('<a class="button" href="{}">Create a checkout link</a>', url)
