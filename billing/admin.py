"""The finance admin for the money core: read-only money, confirmed and recorded actions.

Nothing here writes a billing row: money moves and key revocations go through
reconciliation.services.finance, which records the staff action in the same transaction.
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.core.paginator import Paginator
from django.db import DataError
from django.db.models import OuterRef, QuerySet, Subquery, Sum
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, re_path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode

from billing.errors import AccountNotFound, BillingError, RefundExceedsPaid
from billing.models import (
    SYSTEM_ACCOUNT_IDS,
    Account,
    ApiKey,
    Hold,
    LanguageModel,
    LedgerLeg,
    LedgerTransaction,
    Tariff,
    UsageRecord,
)
from billing.money import (
    MONEY_PLACES,
    ZERO,
    MoneyError,
    MoneyField,
    balance_after,
    money_form_field,
    money_str,
)
from billing.selectors import AccountOverview, account_overview_get
from billing.services.accounts import CREDIT_SOURCES, account_refundable
from billing.services.keys import api_key_rate_limits_check
from billing.statements import (
    month_parse,
    statement_context,
    statement_get,
    statement_months,
    statement_pdf,
)

STATEMENT_PAGE_SIZE = 50
CSV_BATCH_SIZE = 1000


READING_QUANTUM = Decimal("0.0001")  # the admin shows amounts to 4 places, at least 2


def money_reading(amount: Decimal) -> str:
    """An amount rounded for reading: 4 places, trailing zeros trimmed down to 2, thousands
    grouped; a non-zero amount that would read as zero keeps two significant digits (one
    request's cost is often a few millionths of a dollar)."""
    rounded = amount.quantize(READING_QUANTUM, rounding=ROUND_HALF_EVEN)
    if rounded == 0 and amount != 0:
        places = max(amount.adjusted() - 1, -MONEY_PLACES)
        tiny = amount.quantize(Decimal(1).scaleb(places), rounding=ROUND_HALF_EVEN)
        return f"{tiny.normalize():f}"
    whole, _, fraction = f"{rounded:,f}".partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


def money_display(amount: Decimal | None, *, exact: bool = False) -> str:
    """How the admin shows every amount: rounded for reading, the exact value on hover (the
    title). `exact` shows the exact value itself, where the figure is the point of the page (a
    confirmation's effect, a posting's legs). Exports, commands and the API print `money_str`."""
    if amount is None:
        return "—"
    if exact:
        return money_str(amount)
    return format_html(
        '<span class="money" title="{} USD">{}</span>', money_str(amount), money_reading(amount)
    )


CHART_WIDTH = 720
CHART_HEIGHT = 120


def day_bars(days: list[tuple[date, Decimal]], *, unit: str, exact: bool = True) -> dict[str, Any]:
    """The geometry of a server-rendered SVG bar chart of one figure per day (no JavaScript and
    no CDN: the machines are offline). Each bar's title gives its day and figure."""
    peak = max((value for _, value in days), default=Decimal(0))
    slot = Decimal(CHART_WIDTH) / max(len(days), 1)
    bars = []
    for index, (day, value) in enumerate(days):
        # Pixels computed in Decimal, so no float ever meets an amount.
        height = (value / peak * CHART_HEIGHT).quantize(Decimal("0.1")) if peak > 0 else 0
        bars.append(
            {
                "x": (index * slot + 1).quantize(Decimal("0.1")),
                "y": CHART_HEIGHT - height,
                "width": (slot - 2).quantize(Decimal("0.1")),
                "height": height,
                "title": f"{day:%Y-%m-%d}: {money_str(value) if exact else value} {unit}",
                "label": f"{day:%m-%d}" if index % 7 == 0 or index == len(days) - 1 else "",
                # The last day's label ends at the chart's edge rather than running past it.
                "label_x": (
                    (index + (1 if index == len(days) - 1 else Decimal("0.5"))) * slot
                ).quantize(Decimal("0.1")),
                "anchor": "end" if index == len(days) - 1 else "middle",
            }
        )
    return {
        "bars": bars,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "total_height": CHART_HEIGHT + 16,
        "label_y": CHART_HEIGHT + 12,
        "peak": money_display(peak) if exact else f"{peak:,}",
        "unit": unit,
    }


def duration_display(delta: timedelta) -> str:
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s"


class ReadOnlyAdmin(admin.ModelAdmin):
    """Financial records are never added, edited or deleted by hand, not even by a superuser."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- Accounts ---------------------------------------------------------------------------------


def memo_required(memo: str) -> str:
    memo = memo.strip()
    if not memo:
        raise forms.ValidationError("A memo is required.")
    return memo


def memo_field(help_text: str = "") -> forms.CharField:
    """The memo every staff action needs (required; `memo_required` cleans it)."""
    return forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}), help_text=help_text
    )


def form_key_new() -> str:
    return uuid.uuid4().hex


class CreditForm(forms.Form):
    amount = money_form_field()  # within what the database holds: beyond it, a form error
    memo = memo_field()
    # Made when the form is first rendered: a double submit reuses it and posts once.
    idempotency_key = forms.CharField(widget=forms.HiddenInput, max_length=64)

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])


class AccountOpenForm(forms.Form):
    """A new customer account. The opening credit is posted next, on the grant or purchase
    confirmation page, so it is reviewed and recorded like any other credit."""

    name = forms.CharField(max_length=200)
    billing_email = forms.EmailField(required=False)
    overdraft = money_form_field(
        min_value=ZERO,
        initial=ZERO,
        help_text="How far below zero the available balance may go (USD).",
    )
    opening_credit = money_form_field(
        min_value=ZERO,
        required=False,
        help_text="USD. Posted next, on its own confirmation page.",
    )
    opening_credit_kind = forms.ChoiceField(
        choices=[
            (LedgerTransaction.Kind.GRANT, "Grant (promotional credit)"),
            (LedgerTransaction.Kind.PURCHASE, "Purchase (paid by the customer)"),
        ],
        initial=LedgerTransaction.Kind.GRANT,
    )
    memo = memo_field("Why this account: recorded as a staff action.")
    # Made when the form is first rendered: a double submit creates one account.
    form_key = forms.CharField(widget=forms.HiddenInput, max_length=64)

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])


CREDIT_KIND_LABELS: dict[str, str] = {
    LedgerTransaction.Kind.GRANT: "Grant credit",
    LedgerTransaction.Kind.PURCHASE: "Record a purchase",
    LedgerTransaction.Kind.REFUND: "Refund",
    LedgerTransaction.Kind.ADJUSTMENT: "Adjust (signed)",
}
# The admin permission (AccountAdmin.has_<name>_permission) each credit kind needs: adjustments
# are signed and unbounded (a refund is bounded by what was paid), so they have their own.
CREDIT_KIND_PERMISSIONS: dict[str, str] = {
    LedgerTransaction.Kind.GRANT: "post_adjustment",
    LedgerTransaction.Kind.PURCHASE: "post_adjustment",
    LedgerTransaction.Kind.REFUND: "post_adjustment",
    LedgerTransaction.Kind.ADJUSTMENT: "post_balance_adjustment",
}


def _credit_action(kind: str) -> Any:
    @admin.action(
        permissions=[CREDIT_KIND_PERMISSIONS[kind]], description=f"{CREDIT_KIND_LABELS[kind]}…"
    )
    def action(modeladmin: AccountAdmin, request: HttpRequest, queryset: QuerySet[Account]) -> Any:
        accounts = list(queryset.filter(kind=Account.Kind.CUSTOMER).values_list("pk", flat=True))
        if len(accounts) != 1:
            modeladmin.message_user(
                request, "Select exactly one customer account.", messages.WARNING
            )
            return None
        return redirect("admin:billing_account_credit", account_id=accounts[0], kind=kind)

    action.__name__ = f"credit_{kind}"
    return action


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "name",
        "kind",
        "status",
        "balance_display",
        "held_display",
        "available_display",
        "overdraft_display",
        "statement_link",
    )
    list_filter = ("status", "kind")
    search_fields = ("name", "=id")
    readonly_fields = ("balance_display", "held_display", "available_display", "overdraft_display")
    # Balance, held, available and overdraft head the account page (change_form.html).
    fields = (
        "name",
        "kind",
        "currency",
        "status",
        "created_at",
        # Payments and alerts (billing/payments/): set by set_auto_topup / set_alerts and the API.
        "billing_email",
        "low_balance_threshold",
        "webhook_url",
        ("auto_topup_enabled", "auto_topup_threshold", "auto_topup_amount"),
        "auto_topup_monthly_limit",
        ("payment_customer_id", "payment_method_id"),
    )
    actions = [_credit_action(kind) for kind in CREDIT_KIND_LABELS]

    def has_post_adjustment_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("billing.post_adjustment")

    def has_post_balance_adjustment_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("billing.post_balance_adjustment")

    def has_credit_permission(self, request: HttpRequest, kind: str) -> bool:
        check = getattr(self, f"has_{CREDIT_KIND_PERMISSIONS[kind]}_permission")
        return bool(check(request))

    def _credit_kinds(self, request: HttpRequest) -> list[tuple[str, str]]:
        """The credit buttons this user may use."""
        return [
            (kind, label)
            for kind, label in CREDIT_KIND_LABELS.items()
            if self.has_credit_permission(request, kind)
        ]

    @admin.display(description="balance", ordering="balance")
    def balance_display(self, account: Account) -> str:
        return money_display(account.balance)

    @admin.display(description="held", ordering="held")
    def held_display(self, account: Account) -> str:
        return money_display(account.held)

    @admin.display(description="available")
    def available_display(self, account: Account) -> str:
        return money_display(account.available)

    @admin.display(description="overdraft", ordering="overdraft")
    def overdraft_display(self, account: Account) -> str:
        return money_display(account.overdraft)

    @admin.display(description="statement")
    def statement_link(self, account: Account) -> str:
        url = reverse("admin:billing_account_statement", args=[account.pk])
        return format_html('<a href="{}">statement</a>', url)

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            # System accounts have negative ids, which <int:> would not match.
            re_path(
                r"^(?P<account_id>-?\d+)/statement/$",
                wrap(self.statement_view),
                name="billing_account_statement",
            ),
            path(
                "<int:account_id>/credit/<str:kind>/",
                wrap(self.credit_view),
                name="billing_account_credit",
            ),
            *super().get_urls(),
        ]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Opening an account moves no money: the opening credit needs post_adjustment on
        # its own confirmation page.
        return request.user.has_perm("billing.add_account")

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The Add button: the account's fields, a review of them, then the opening credit's
        own confirmation page. One StaffAction (account_open), one history entry."""
        # Import here: reconciliation depends on billing, never the other way at import time.
        from reconciliation.services.onboarding import account_open_by_staff

        if not self.has_add_permission(request):
            raise PermissionDenied
        stage = "edit"
        if request.method == "POST":
            form = AccountOpenForm(request.POST)
            if form.is_valid() and "confirm" in request.POST:
                data = form.cleaned_data
                try:
                    opened = account_open_by_staff(
                        name=data["name"],
                        billing_email=data["billing_email"],
                        overdraft=data["overdraft"],
                        user=request.user,  # type: ignore[arg-type]
                        memo=data["memo"],
                        form_key=data["form_key"],
                        now=timezone.now(),
                    )
                except BillingError as exc:
                    form.add_error(None, str(exc))
                else:
                    return self._account_opened(request, opened, form)
            elif form.is_valid():
                stage = "confirm"
        else:
            form = AccountOpenForm(initial={"form_key": form_key_new()})
        credit = form.cleaned_data.get("opening_credit") if stage == "confirm" else None
        return TemplateResponse(
            request,
            "admin/billing/account/open.html",
            self._context(
                request,
                "Add a customer account" + (": confirm" if stage == "confirm" else ""),
                form=form,
                stage=stage,
                overdraft=(
                    money_display(form.cleaned_data["overdraft"], exact=True)
                    if stage == "confirm"
                    else None
                ),
                opening_credit=money_display(credit, exact=True) if credit else None,
                can_credit=self.has_post_adjustment_permission(request),
            ),
        )

    def _account_opened(self, request: HttpRequest, opened: Any, form: AccountOpenForm) -> Any:
        account = opened.account
        if opened.replayed:
            self.message_user(
                request,
                f"This form already created {account}; nothing new was created.",
                messages.WARNING,
            )
            return redirect("admin:billing_account_change", account.pk)
        self.log_addition(request, account, [{"added": {}}])
        self.message_user(request, f"Created {account}.", messages.SUCCESS)
        credit = form.cleaned_data["opening_credit"]
        if credit and self.has_post_adjustment_permission(request):
            kind = form.cleaned_data["opening_credit_kind"]
            query = urlencode({"amount": money_str(credit), "memo": "Opening credit"})
            url = reverse("admin:billing_account_credit", args=[account.pk, kind])
            return redirect(f"{url}?{query}")
        if credit:
            self.message_user(
                request,
                f"The opening credit of {money_str(credit)} USD is not posted: posting credit "
                "needs the billing.post_adjustment permission.",
                messages.WARNING,
            )
        return redirect("admin:billing_account_change", account.pk)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra = {"credit_kinds": self._credit_kinds(request)}
        if object_id.lstrip("-").isdigit() and self.has_view_permission(request):
            try:
                overview = account_overview_get(account_id=int(object_id), now=timezone.now())
            except AccountNotFound:
                pass  # the admin's own "does not exist" answer follows
            else:
                extra.update(self._overview_context(request, overview))
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), **extra})

    def _overview_context(self, request: HttpRequest, overview: AccountOverview) -> dict[str, Any]:
        """The account page as one screen: figures, keys, holds, entries, usage, open items."""
        # Import here: reconciliation depends on billing, never the other way at import time.
        from reconciliation.selectors import account_items_open

        account = overview.account
        user = request.user
        can_change_keys = user.has_perm("billing.change_apikey")
        can_revoke = can_change_keys or user.has_perm("billing.post_adjustment")
        revoke_url = reverse("admin:billing_apikey_revoke")
        keys = []
        for key in overview.keys:
            # Only an active key's settings change or its revoke is offered.
            active = key.status == ApiKey.Status.ACTIVE
            editable = active and can_change_keys
            keys.append({
                "key": key,
                "budget": money_display(key.budget_limit),
                "spent": money_display(key.budget_spent),
                "held": money_display(key.budget_held),
                "rate_limits": _rate_limits_text(key.rpm, key.tpm),
                "budget_url": (
                    reverse("admin:billing_apikey_budget", args=[key.pk]) if editable else None
                ),
                "rate_limits_url": (
                    reverse("admin:billing_apikey_rate_limits", args=[key.pk])
                    if editable
                    else None
                ),
                "revoke_url": (
                    f"{revoke_url}?{urlencode({'ids': key.pk})}"
                    if active and can_revoke
                    else None
                ),
            })
        holds = [
            {"hold": hold, "amount": money_display(hold.amount)} for hold in overview.active_holds
        ]
        entries = [
            {"leg": leg, "txn": leg.transaction, "amount": money_display(leg.amount)}
            for leg in overview.entries
        ]
        items = [
            {
                "item": item,
                "cost": money_display(item.cost),
                "held": money_display(item.held_amount),
            }
            for item in account_items_open(account_id=account.pk)
        ]
        usage = overview.usage_by_day
        return {
            "overview": overview,
            "figures": [
                (name, money_display(amount), money_str(amount))
                for name, amount in (
                    ("Balance", overview.balance),
                    ("Held", account.held),
                    ("Available", overview.balance - account.held),
                    ("Overdraft allowed", account.overdraft),
                )
            ],
            "keys": keys,
            "holds": holds,
            "entries": entries,
            "items": items,
            "usage_days": [
                {
                    "day": day.day,
                    "requests": day.requests,
                    "tokens": day.tokens,
                    "cost": money_display(day.cost),
                }
                for day in usage
            ],
            "usage_cost": money_display(overview.usage_cost),
            "spend_chart": day_bars([(day.day, day.cost) for day in usage], unit="USD"),
            "tokens_chart": day_bars(
                [(day.day, Decimal(day.tokens)) for day in usage], unit="tokens", exact=False
            ),
            "issue_key_url": (
                f"{reverse('admin:billing_apikey_add')}?{urlencode({'account': account.pk})}"
                if user.has_perm("billing.add_apikey") and not account.is_system
                else None
            ),
            "keys_url": (
                f"{reverse('admin:billing_apikey_changelist')}?account__id__exact={account.pk}"
            ),
            "holds_url": (
                f"{reverse('admin:billing_hold_changelist')}"
                f"?account__id__exact={account.pk}&state__exact=active"
            ),
            "ledger_url": reverse("admin:billing_ledgertransaction_changelist")
            + f"?account={account.pk}",
            "items_url": (
                f"{reverse('admin:reconciliation_reconciliationitem_changelist')}"
                f"?account__id__exact={account.pk}&status__exact=pending"
            ),
            "statement_url": reverse("admin:billing_account_statement", args=[account.pk]),
            "statement_months": statement_months(account_id=account.pk, now=timezone.now()),
            "payment_settings": [
                (label, url)
                for label, url, permission in (
                    (
                        "Auto top-up",
                        reverse("admin:billing_account_auto_topup", args=[account.pk]),
                        "billing.set_auto_topup",
                    ),
                    (
                        "Balance alerts",
                        reverse("admin:billing_account_alerts", args=[account.pk]),
                        "billing.set_alerts",
                    ),
                    (
                        "Checkout link",
                        f"{reverse('admin:billing_checkout_link')}?account={account.pk}",
                        "billing.add_checkout",
                    ),
                )
                if user.has_perm(permission)
            ]
            if not account.is_system  # system accounts have no settings or checkout
            else [],
        }

    def _context(self, request: HttpRequest, title: str, **more: Any) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": title,
            **more,
        }

    def statement_view(self, request: HttpRequest, account_id: str) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        account = Account.objects.filter(pk=account_id).first()
        if account is None:
            raise Http404("no such account")
        if request.GET.get("month") and not account.is_system:
            return self._month_statement(request, account, request.GET["month"])
        legs = (
            LedgerLeg.objects.filter(account_id=account_id)
            .select_related("transaction")
            .order_by("-transaction__posted_at", "-pk")
        )
        page = Paginator(legs, STATEMENT_PAGE_SIZE).get_page(request.GET.get("page"))
        # System accounts keep no cached balance (it would be a hot row): sum their legs.
        balance = (
            account.balance
            if not account.is_system
            else LedgerLeg.objects.filter(account_id=account_id).aggregate(total=Sum("amount"))[
                "total"
            ]
            or Decimal(0)
        )
        return TemplateResponse(
            request,
            "admin/billing/account/statement.html",
            self._context(
                request,
                f"Statement of {account}",
                account=account,
                balance=money_display(balance, exact=True),
                page=page,
                rows=[
                    {"leg": leg, "txn": leg.transaction, "amount": money_str(leg.amount)}
                    for leg in page.object_list
                ],
                ledger_url=reverse("admin:billing_ledgertransaction_changelist")
                + f"?account={account.pk}",
                credit_kinds=self._credit_kinds(request) if not account.is_system else [],
                months=[]
                if account.is_system
                else statement_months(account_id=account.pk, now=timezone.now()),
            ),
        )

    def _month_statement(self, request: HttpRequest, account: Account, month: str) -> HttpResponse:
        """The account's statement of one UTC month (?month=YYYY-MM): as issued if it was,
        else from the ledger now (provisional for the current month); &format=pdf for PDF."""
        try:
            figures, pdf = statement_get(
                account_id=account.pk, month=month_parse(month), now=timezone.now()
            )
        except BillingError as exc:
            messages.error(request, str(exc))
            return redirect("admin:billing_account_statement", account_id=account.pk)
        if request.GET.get("format") == "pdf":
            response = HttpResponse(
                pdf if pdf is not None else statement_pdf(figures), content_type="application/pdf"
            )
            response["Content-Disposition"] = f'inline; filename="statement-{month}.pdf"'
            return response
        return TemplateResponse(
            request,
            "admin/billing/account/statement.html",
            self._context(
                request,
                f"Statement of {account} for {figures.data['month']}",
                account=account,
                month=figures.data["month"],
                months=statement_months(account_id=account.pk, now=timezone.now()),
                **statement_context(figures),
            ),
        )

    def credit_view(self, request: HttpRequest, account_id: int, kind: str) -> HttpResponse:
        # Import here: reconciliation depends on billing, never the other way at import time.
        from reconciliation.services.finance import credit_post_by_staff

        if kind not in CREDIT_SOURCES:
            raise Http404("not a credit kind")
        if not self.has_credit_permission(request, kind):
            raise PermissionDenied
        account = Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER).first()
        if account is None:
            raise Http404("no such customer account")

        stage = "edit"
        new_balance = None
        # What a refund may return (the engine checks it again, under the account's lock).
        refundable = (
            account_refundable(account_id=account.pk)
            if kind == LedgerTransaction.Kind.REFUND
            else None
        )
        if request.method == "POST":
            form = CreditForm(request.POST)
            if form.is_valid():
                amount = form.cleaned_data["amount"]
                try:
                    after = balance_after(account.balance, amount)
                except MoneyError as exc:
                    message = str(exc)
                    form.add_error("amount", f"{message[:1].upper()}{message[1:]}.")
            if form.is_valid():
                if refundable is not None and amount > refundable and "confirm" not in request.POST:
                    form.add_error("amount", str(RefundExceedsPaid(refundable=refundable)))
                elif "confirm" in request.POST:
                    try:
                        posted = credit_post_by_staff(
                            kind=kind,
                            account_id=account.pk,
                            amount=amount,
                            memo=form.cleaned_data["memo"],
                            idempotency_key=form.cleaned_data["idempotency_key"],
                            user=request.user,  # type: ignore[arg-type]
                            now=timezone.now(),
                        )
                    except BillingError as exc:
                        form.add_error(None, str(exc))
                        if isinstance(exc, RefundExceedsPaid):
                            refundable = exc.refundable  # as the engine saw it, under the lock
                    except DataError as exc:
                        # The balance moved past what fits since it was read above: the
                        # engine's UPDATE overflowed, and its transaction posted nothing.
                        form.add_error(
                            None,
                            "Nothing was posted: the database cannot store the result "
                            f"({str(exc).splitlines()[0]}).",
                        )
                    else:
                        if posted.replayed:
                            self.message_user(
                                request,
                                f"Already posted as transaction #{posted.transaction_id}; "
                                "nothing new posted.",
                                messages.WARNING,
                            )
                        else:
                            self.message_user(
                                request,
                                f"Posted {kind} of {money_str(amount)} USD "
                                f"as transaction #{posted.transaction_id}.",
                                messages.SUCCESS,
                            )
                        return redirect("admin:billing_account_change", account.pk)
                else:
                    stage = "confirm"
                    new_balance = after
        else:
            # Prefilled when account onboarding hands its opening credit over to this page.
            form = CreditForm(
                initial={
                    "idempotency_key": form_key_new(),
                    "amount": request.GET.get("amount", ""),
                    "memo": request.GET.get("memo", ""),
                }
            )
        return TemplateResponse(
            request,
            "admin/billing/account/credit_confirm.html",
            self._context(
                request,
                f"{CREDIT_KIND_LABELS[kind]}: {account}",
                account=account,
                kind=kind,
                form=form,
                stage=stage,
                balance=money_display(account.balance, exact=True),
                new_balance=(
                    money_display(new_balance, exact=True) if new_balance is not None else None
                ),
                amount=money_str(form.cleaned_data["amount"]) if stage == "confirm" else None,
                source=CREDIT_SOURCES[kind],
                refundable=(
                    money_display(refundable, exact=True) if refundable is not None else None
                ),
            ),
        )


# --- API keys, models, tariffs ------------------------------------------------------------------


class MemoForm(forms.Form):
    memo = memo_field()

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])


BUDGET_PERIOD_CHOICES = [("", "no budget"), *ApiKey.BudgetPeriod.choices]


RATE_LIMIT_LABELS = {
    "rpm": ("Requests per minute", "At most this many requests"),
    "tpm": ("Tokens per minute", "At most this many billed tokens (input plus output)"),
}


def rate_limit_field(name: str) -> forms.IntegerField:
    """A key's rpm or tpm; checked by `rate_limits_clean`, the service's own rule."""
    label, what = RATE_LIMIT_LABELS[name]
    return forms.IntegerField(
        required=False, label=label, help_text=f"{what} in any 60 s. Empty: no limit."
    )


def rate_limits_clean(form: forms.Form) -> None:
    """Refuse a limit the key cannot have at the review, not only at the confirmation."""
    data = form.cleaned_data
    if "rpm" in data and "tpm" in data:  # else a field error is shown already
        try:
            api_key_rate_limits_check(rpm=data["rpm"], tpm=data["tpm"])
        except BillingError as exc:
            _service_error(form, exc)


class KeyIssueForm(forms.Form):
    """A new key. Its secret is made by the service and shown once, on the page that answers
    the confirmation; nothing here ever holds it."""

    account = forms.ModelChoiceField(
        queryset=Account.objects.filter(
            kind=Account.Kind.CUSTOMER, status=Account.Status.ACTIVE
        ).order_by("name", "pk")
    )
    name = forms.CharField(max_length=200, required=False)
    purpose = forms.ChoiceField(choices=ApiKey.Purpose.choices, initial=ApiKey.Purpose.REALTIME)
    scope = forms.ChoiceField(
        choices=ApiKey.Scope.choices,
        initial=ApiKey.Scope.INFERENCE,
        help_text="inference: completions and the account's reads; admin: also the account's "
        "self-service endpoints.",
    )
    budget_limit = money_form_field(min_value=ZERO, required=False, label="Budget (USD)")
    budget_period = forms.ChoiceField(choices=BUDGET_PERIOD_CHOICES, required=False)
    rpm = rate_limit_field("rpm")
    tpm = rate_limit_field("tpm")
    expires_at = forms.DateTimeField(
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="UTC. Empty: the key does not expire.",
    )
    memo = memo_field("Why this key: recorded as a staff action (never the secret).")
    # Made when the form is first rendered: a second submit (a reload) issues nothing new.
    form_key = forms.CharField(widget=forms.HiddenInput, max_length=64)

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        rate_limits_clean(self)
        return data


class KeyBudgetForm(forms.Form):
    budget_limit = money_form_field(min_value=ZERO, required=False, label="Budget (USD)")
    budget_period = forms.ChoiceField(choices=BUDGET_PERIOD_CHOICES, required=False)
    memo = memo_field()

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])


class KeyRateLimitsForm(forms.Form):
    rpm = rate_limit_field("rpm")
    tpm = rate_limit_field("tpm")
    memo = memo_field()

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        rate_limits_clean(self)
        return data


def _service_error(form: forms.Form, exc: BillingError) -> None:
    """Show a service's refusal on the form field it names, if the form has one."""
    field = getattr(exc, "field", None)
    form.add_error(field if field in form.fields else None, str(exc))


def _budget_text(limit: Decimal | None, period: str) -> str:
    return "no budget" if limit is None else f"{money_str(limit)} USD per {period}"


def _rate_limits_text(rpm: int | None, tpm: int | None) -> str:
    limits = [
        f"{limit:,} {unit}"
        for limit, unit in ((rpm, "requests"), (tpm, "tokens"))
        if limit is not None
    ]
    return " and ".join(limits) + " per minute" if limits else "no limit"


@admin.register(ApiKey)
class ApiKeyAdmin(ReadOnlyAdmin):
    # Never the secret hash: the prefix is enough to recognise a key.
    fields = (
        "prefix",
        "name",
        "account",
        "purpose",
        "scope",
        "completion_window",
        "status",
        "created_at",
        "revoked_at",
        "expires_at",
        "budget_limit_display",
        "budget_period",
        "budget_spent_display",
        "budget_held_display",
        "rpm",
        "tpm",
    )
    readonly_fields = ("budget_limit_display", "budget_spent_display", "budget_held_display")
    list_display = (
        "prefix",
        "name",
        "account",
        "purpose",
        "scope",
        "status",
        "budget_limit_display",
        "budget_period",
        "budget_spent_display",
        "budget_held_display",
        "rpm",
        "tpm",
        "created_at",
    )
    list_filter = ("status", "purpose")
    search_fields = ("prefix", "name", "=account__id")
    list_select_related = ("account",)
    actions = ["revoke"]

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("billing.change_apikey") or request.user.has_perm(
            "billing.post_adjustment"
        )

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("billing.add_apikey")

    def has_setting_permission(self, request: HttpRequest) -> bool:
        """Who may change a key's budget and rate limits."""
        return request.user.has_perm("billing.change_apikey")

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        tools = []
        key = ApiKey.objects.filter(pk=object_id).first() if object_id.isdigit() else None
        if key is not None:
            tools.append(
                (reverse("admin:billing_account_change", args=[key.account_id]), "Account")
            )
            if key.status == ApiKey.Status.ACTIVE and self.has_setting_permission(request):
                tools.append((reverse("admin:billing_apikey_budget", args=[key.pk]), "Edit budget"))
                url = reverse("admin:billing_apikey_rate_limits", args=[key.pk])
                tools.append((url, "Edit rate limits"))
            if key.status == ApiKey.Status.ACTIVE and self.has_revoke_permission(request):
                url = reverse("admin:billing_apikey_revoke")
                tools.append((f"{url}?{urlencode({'ids': key.pk})}", "Revoke"))
        return super().change_view(
            request, object_id, form_url, {**(extra_context or {}), "key_tools": tools}
        )

    def _context(self, request: HttpRequest, title: str, **more: Any) -> dict[str, Any]:
        return {**self.admin_site.each_context(request), "opts": self.opts, "title": title, **more}

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """Issue a key: the settings, a review of them, then the secret, once."""
        # Import here: reconciliation depends on billing, never the other way at import time.
        from reconciliation.services.onboarding import api_key_issue_by_staff

        if not self.has_add_permission(request):
            raise PermissionDenied
        stage = "edit"
        if request.method == "POST":
            form = KeyIssueForm(request.POST)
            if form.is_valid() and "confirm" in request.POST:
                data = form.cleaned_data
                try:
                    issued = api_key_issue_by_staff(
                        account_id=data["account"].pk,
                        name=data["name"],
                        purpose=data["purpose"],
                        scope=data["scope"],
                        budget_limit=data["budget_limit"],
                        budget_period=data["budget_period"],
                        rpm=data["rpm"],
                        tpm=data["tpm"],
                        expires_at=data["expires_at"],
                        user=request.user,  # type: ignore[arg-type]
                        memo=data["memo"],
                        form_key=data["form_key"],
                        now=timezone.now(),
                    )
                except BillingError as exc:
                    _service_error(form, exc)
                else:
                    return self._key_issued(request, issued)
            elif form.is_valid():
                stage = "confirm"
        else:
            initial: dict[str, Any] = {"form_key": form_key_new()}
            account = request.GET.get("account", "")
            if account.isdigit():
                initial["account"] = int(account)
            form = KeyIssueForm(initial=initial)
        data = form.cleaned_data if stage == "confirm" else {}
        return TemplateResponse(
            request,
            "admin/billing/apikey/issue.html",
            self._context(
                request,
                "Issue an API key" + (": confirm" if stage == "confirm" else ""),
                form=form,
                stage=stage,
                budget=(
                    _budget_text(data["budget_limit"], data["budget_period"]) if data else None
                ),
                rate_limits=_rate_limits_text(data["rpm"], data["tpm"]) if data else None,
            ),
        )

    def _key_issued(self, request: HttpRequest, issued: Any) -> HttpResponse:
        """The one response that carries the secret: not stored, not cached, not a message."""
        api_key = issued.api_key
        if issued.secret is not None:
            self.log_addition(request, api_key, [{"added": {}}])
        response = TemplateResponse(
            request,
            "admin/billing/apikey/issued.html",
            self._context(
                request,
                "API key issued" if issued.secret else "API key already issued",
                api_key=api_key,
                secret=issued.secret,
                account_url=reverse("admin:billing_account_change", args=[api_key.account_id]),
            ),
        )
        response["Cache-Control"] = "no-store"
        return response

    def budget_view(self, request: HttpRequest, key_id: int) -> HttpResponse:
        """Change a key's budget: the new one, a review against what the period has used, a
        memo; one StaffAction."""
        # Import here: reconciliation depends on billing, never the other way at import time.
        from reconciliation.services.onboarding import api_key_budget_set_by_staff

        return self._key_setting_view(
            request,
            key_id,
            what="budget",
            form_class=KeyBudgetForm,
            initial=lambda key: {
                "budget_limit": key.budget_limit,
                "budget_period": key.budget_period,
            },
            apply=lambda key, data, user, memo: api_key_budget_set_by_staff(
                key_id=key.pk,
                budget_limit=data["budget_limit"],
                budget_period=data["budget_period"],
                user=user,
                memo=memo,
                now=timezone.now(),
            ),
            template="admin/billing/apikey/budget_confirm.html",
            context=lambda key, data: {
                "budget_now": _budget_text(key.budget_limit, key.budget_period),
                "budget_after": (
                    _budget_text(data["budget_limit"], data["budget_period"]) if data else None
                ),
                "spent": money_display(key.budget_spent, exact=True),
                "held": money_display(key.budget_held, exact=True),
            },
        )

    def rate_limits_view(self, request: HttpRequest, key_id: int) -> HttpResponse:
        """Change a key's rpm and tpm: the new ones, a review against the current ones, a memo;
        one StaffAction."""
        # Import here: reconciliation depends on billing, never the other way at import time.
        from reconciliation.services.onboarding import api_key_rate_limits_set_by_staff

        return self._key_setting_view(
            request,
            key_id,
            what="rate limits",
            form_class=KeyRateLimitsForm,
            initial=lambda key: {"rpm": key.rpm, "tpm": key.tpm},
            apply=lambda key, data, user, memo: api_key_rate_limits_set_by_staff(
                key_id=key.pk,
                rpm=data["rpm"],
                tpm=data["tpm"],
                user=user,
                memo=memo,
                now=timezone.now(),
            ),
            template="admin/billing/apikey/rate_limits_confirm.html",
            context=lambda key, data: {
                "rate_limits_now": _rate_limits_text(key.rpm, key.tpm),
                "rate_limits_after": _rate_limits_text(data["rpm"], data["tpm"]) if data else None,
            },
        )

    def _key_setting_view(
        self,
        request: HttpRequest,
        key_id: int,
        *,
        what: str,
        form_class: type[forms.Form],
        initial: Callable[[ApiKey], dict[str, Any]],
        apply: Callable[[ApiKey, dict[str, Any], Any, str], object],
        template: str,
        context: Callable[[ApiKey, dict[str, Any]], dict[str, Any]],
    ) -> HttpResponse:
        """One setting of an active key: the edit form, a review of
        the setting before and after, then `apply` with the memo (the service records the
        StaffAction). A service's refusal is shown on the form."""
        if not self.has_setting_permission(request):
            raise PermissionDenied
        key = ApiKey.objects.filter(pk=key_id).select_related("account").first()
        if key is None:
            raise Http404("no such key")
        if key.status != ApiKey.Status.ACTIVE:
            self.message_user(
                request, f"{key} is {key.status}: its {what} cannot change.", messages.WARNING
            )
            return redirect("admin:billing_apikey_change", key.pk)
        stage = "edit"
        if request.method == "POST":
            form = form_class(request.POST)
            if form.is_valid() and "confirm" in request.POST:
                try:
                    apply(key, form.cleaned_data, request.user, form.cleaned_data["memo"])
                except BillingError as exc:
                    _service_error(form, exc)
                else:
                    self.message_user(
                        request, f"{what.capitalize()} of {key.prefix} changed.", messages.SUCCESS
                    )
                    return redirect("admin:billing_apikey_change", key.pk)
            elif form.is_valid():
                stage = "confirm"
        else:
            form = form_class(initial=initial(key))
        data = form.cleaned_data if stage == "confirm" else {}
        return TemplateResponse(
            request,
            template,
            self._context(
                request,
                f"{what.capitalize()} of {key}" + (": confirm" if stage == "confirm" else ""),
                api_key=key,
                form=form,
                stage=stage,
                **context(key, data),
            ),
        )

    @admin.display(description="budget")
    def budget_limit_display(self, key: ApiKey) -> str:
        return money_display(key.budget_limit)

    @admin.display(description="spent in period")
    def budget_spent_display(self, key: ApiKey) -> str:
        return money_display(key.budget_spent)

    @admin.display(description="held under budget")
    def budget_held_display(self, key: ApiKey) -> str:
        return money_display(key.budget_held)

    @admin.action(permissions=["revoke"], description="Revoke selected keys…")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> Any:
        ids = ",".join(str(pk) for pk in queryset.order_by("pk").values_list("pk", flat=True))
        return redirect(f"{reverse('admin:billing_apikey_revoke')}?{urlencode({'ids': ids})}")

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "revoke/",
                self.admin_site.admin_view(self.revoke_view),
                name="billing_apikey_revoke",
            ),
            path(
                "<int:key_id>/budget/",
                self.admin_site.admin_view(self.budget_view),
                name="billing_apikey_budget",
            ),
            path(
                "<int:key_id>/rate-limits/",
                self.admin_site.admin_view(self.rate_limits_view),
                name="billing_apikey_rate_limits",
            ),
            *super().get_urls(),
        ]

    def revoke_view(self, request: HttpRequest) -> HttpResponse:
        """Confirm a revocation: the keys by prefix, and a memo; one StaffAction per key."""
        # Import here: reconciliation depends on billing, never the other way at import time.
        from reconciliation.services.finance import api_keys_revoke_by_staff

        if not self.has_revoke_permission(request):
            raise PermissionDenied
        raw_ids = request.POST.get("ids") if request.method == "POST" else request.GET.get("ids")
        ids = [int(part) for part in (raw_ids or "").split(",") if part.strip().isdigit()]
        keys = list(ApiKey.objects.filter(pk__in=ids).select_related("account").order_by("pk"))
        if not keys:
            raise Http404("no such keys")

        form = MemoForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            try:
                results = api_keys_revoke_by_staff(
                    key_ids=[key.pk for key in keys],
                    user=request.user,  # type: ignore[arg-type]
                    memo=form.cleaned_data["memo"],
                    now=timezone.now(),
                )
            except BillingError as exc:
                form.add_error(None, str(exc))
            else:
                revoked = [r.api_key.prefix for r in results if r.changed]
                already = [r.api_key.prefix for r in results if not r.changed]
                if revoked:
                    self.message_user(request, f"Revoked {', '.join(revoked)}.", messages.SUCCESS)
                if already:
                    self.message_user(
                        request,
                        f"Already revoked, nothing changed: {', '.join(already)}.",
                        messages.WARNING,
                    )
                return redirect("admin:billing_apikey_changelist")
        return TemplateResponse(
            request,
            "admin/billing/apikey/revoke_confirm.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": "Revoke API keys: confirm",
                "keys": keys,
                "ids": ",".join(str(key.pk) for key in keys),
                "form": form,
            },
        )


@admin.register(LanguageModel)
class LanguageModelAdmin(ReadOnlyAdmin):
    list_display = ("alias", "created_at")
    search_fields = ("alias",)


class TariffAddForm(forms.ModelForm):
    """The add form: the tariff's fields and why it is being set (its StaffAction's memo)."""

    memo = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Why this price: recorded with the tariff as a staff action.",
    )

    class Meta:
        model = Tariff
        fields = (
            "model",
            "account",
            "purpose",
            "completion_window",
            "valid_from",
            "valid_until",
            "input_per_mtok",
            "output_per_mtok",
            "cached_input_per_mtok",
            "cache_write_per_mtok",
            "reasoning_per_mtok",
        )


@admin.register(Tariff)
class TariffAdmin(admin.ModelAdmin):
    """Append-only: a new price is a new tariff row, added through `tariff_set_by_staff`
    (needs billing.add_tariff, which the Finance group does not have by itself)."""

    list_display = (
        "model",
        "account",
        "purpose",
        "completion_window",
        "valid_from",
        "valid_until",
        "input_price",
        "output_price",
    )
    list_filter = ("purpose", "model", ("account", admin.EmptyFieldListFilter))
    list_select_related = ("model", "account")
    raw_id_fields = ("account",)
    search_fields = ("model__alias",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        # The memo belongs to adding only; an existing tariff is shown read-only without one.
        if obj is None:
            kwargs["form"] = TariffAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    @admin.display(description="input / Mtok")
    def input_price(self, tariff: Tariff) -> str:
        return money_display(tariff.input_per_mtok)

    @admin.display(description="output / Mtok")
    def output_price(self, tariff: Tariff) -> str:
        return money_display(tariff.output_per_mtok)

    def save_model(self, request: HttpRequest, obj: Tariff, form: Any, change: bool) -> None:
        # Import here: reconciliation depends on billing, never the other way at import time.
        from reconciliation.services.finance import tariff_set_by_staff

        data = form.cleaned_data
        # Runs inside the admin's atomic block (changeform_view): the tariff, its StaffAction
        # and the admin's LogEntry commit together. The form has validated the fields and the
        # model's constraints already (non-negative prices, valid_until after valid_from).
        tariff = tariff_set_by_staff(
            user=request.user,  # type: ignore[arg-type]
            memo=data["memo"],
            now=timezone.now(),
            model_alias=data["model"].alias,
            input_per_mtok=data["input_per_mtok"],
            output_per_mtok=data["output_per_mtok"],
            cached_input_per_mtok=data.get("cached_input_per_mtok"),
            cache_write_per_mtok=data.get("cache_write_per_mtok"),
            reasoning_per_mtok=data.get("reasoning_per_mtok"),
            purpose=data["purpose"],
            completion_window=data.get("completion_window") or "",
            valid_from=data["valid_from"],
            valid_until=data.get("valid_until"),
            account_id=data["account"].pk if data.get("account") else None,
        )
        # `obj` (the form's unsaved instance) is what the admin passes on to log_addition and
        # response_add; it carries the created row's primary key there, and they use the row.
        obj.pk = tariff.pk

    def _created(self, obj: Tariff) -> Tariff:
        """The row `save_model` created, as stored (read in the admin's transaction)."""
        return Tariff.objects.select_related("model").get(pk=obj.pk)

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        return super().log_addition(request, self._created(obj), message)

    def response_add(
        self, request: HttpRequest, obj: Any, post_url_continue: str | None = None
    ) -> HttpResponse:
        return super().response_add(request, self._created(obj), post_url_continue)


# --- Ledger -----------------------------------------------------------------------------------


class LedgerLegInline(admin.TabularInline):
    model = LedgerLeg
    fields = ("account", "amount_display")
    readonly_fields = ("account", "amount_display")
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="amount")
    def amount_display(self, leg: LedgerLeg) -> str:
        return money_display(leg.amount, exact=True)  # the posting's detail: to the last unit


class LegAccountFilter(admin.SimpleListFilter):
    """Transactions with a leg on one account. Lists the system accounts (plus the chosen one);
    any account is reachable as ?account=<id>, which its statement page links to."""

    title = "account"
    parameter_name = "account"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        ids = set(SYSTEM_ACCOUNT_IDS.values())
        chosen = self.value()
        if chosen and chosen.lstrip("-").isdigit():
            ids.add(int(chosen))
        return [(str(account.pk), str(account)) for account in Account.objects.filter(pk__in=ids)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        if not value.lstrip("-").isdigit():
            return queryset.none()
        # A semi-join, so a transaction with two legs on the account is listed once.
        return queryset.filter(
            pk__in=LedgerLeg.objects.filter(account_id=int(value)).values("transaction_id")
        )


class _Echo:
    """csv.writer wants a file; this one hands each line back instead of storing it."""

    def write(self, value: str) -> str:
        return value


CSV_HEADER = (
    "transaction_id",
    "posted_at",
    "occurred_at",
    "kind",
    "request_id",
    "model",
    "idempotency_key",
    "is_overrun",
    "is_late",
    "posted_by",
    "memo",
    "account_id",
    "amount",
)


def _ledger_csv_batch(queryset: QuerySet[LedgerTransaction], after_pk: int) -> list[list[str]]:
    """The CSV rows (one per leg) of the next CSV_BATCH_SIZE transactions after `after_pk`.

    Keyset batches rather than one server-side cursor: each batch is a short query, so memory
    stays bounded and the export also streams under ASGI, where each batch may run on a
    different thread.
    """
    txns = list(
        queryset.filter(pk__gt=after_pk).order_by("pk").select_related("posted_by")[:CSV_BATCH_SIZE]
    )
    legs: dict[int, list[LedgerLeg]] = {txn.pk: [] for txn in txns}
    for leg in LedgerLeg.objects.filter(transaction_id__in=list(legs)).order_by("pk"):
        legs[leg.transaction_id].append(leg)
    return [
        [
            str(txn.pk),
            txn.posted_at.isoformat(),
            txn.occurred_at.isoformat(),
            txn.kind,
            txn.request_id,
            txn.model_alias,
            txn.idempotency_key,
            str(txn.is_overrun),
            str(txn.is_late),
            txn.posted_by.get_username() if txn.posted_by else "",
            txn.memo,
            str(leg.account_id),
            money_str(leg.amount),
        ]
        for txn in txns
        for leg in legs[txn.pk]
    ]


def ledger_csv_lines(queryset: QuerySet[LedgerTransaction]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_HEADER)
    after_pk = 0
    while rows := _ledger_csv_batch(queryset, after_pk):
        for row in rows:
            yield writer.writerow(row)
        after_pk = int(rows[-1][0])


async def ledger_csv_lines_async(queryset: QuerySet[LedgerTransaction]) -> AsyncIterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_HEADER)
    after_pk = 0
    while rows := await sync_to_async(_ledger_csv_batch)(queryset, after_pk):
        for row in rows:
            yield writer.writerow(row)
        after_pk = int(rows[-1][0])


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "posted_at",
        "kind",
        "request_id",
        "model_alias",
        "amount_display",
        "is_overrun",
        "is_late",
        "posted_by",
        "memo",
    )
    list_filter = ("kind", "is_overrun", "is_late", LegAccountFilter, "model_alias")
    search_fields = ("request_id", "idempotency_key", "=id")
    date_hierarchy = "posted_at"
    list_select_related = ("posted_by",)
    inlines = [LedgerLegInline]
    fields = (
        "kind",
        "idempotency_key",
        "request_id",
        "model_alias",
        "memo",
        "posted_by",
        "occurred_at",
        "posted_at",
        "reverses",
        "is_overrun",
        "is_late",
    )
    show_full_result_count = False  # a count(*) over the whole ledger on every page is waste

    def get_queryset(self, request: HttpRequest) -> QuerySet[LedgerTransaction]:
        moved = (
            LedgerLeg.objects.filter(transaction_id=OuterRef("pk"), amount__gt=0)
            .values("transaction_id")
            .annotate(total=Sum("amount"))
            .values("total")
        )
        return (
            super().get_queryset(request).annotate(moved=Subquery(moved, output_field=MoneyField()))
        )

    @admin.display(description="amount moved")
    def amount_display(self, txn: LedgerTransaction) -> str:
        return money_display(getattr(txn, "moved", None))

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "export.csv",
                self.admin_site.admin_view(self.export_view),
                name="billing_ledgertransaction_export",
            ),
            *super().get_urls(),
        ]

    def export_view(self, request: HttpRequest) -> StreamingHttpResponse:
        """The current changelist's filters, search and date range, every leg, streamed."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        queryset = self.get_changelist_instance(request).queryset
        lines: Iterator[str] | AsyncIterator[str] = (
            ledger_csv_lines_async(queryset)
            if isinstance(request, ASGIRequest)
            else ledger_csv_lines(queryset)
        )
        response = StreamingHttpResponse(lines, content_type="text/csv")
        stamp = timezone.now().strftime("%Y%m%dT%H%M%S")
        response["Content-Disposition"] = f'attachment; filename="ledger-{stamp}.csv"'
        return response


# --- Holds and usage ------------------------------------------------------------------------------


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = (
        "request_id",
        "account",
        "state",
        "amount_display",
        "settled_display",
        "created_at",
        "age",
        "expires_at",
        "expiry",
        "is_overrun",
        "is_late",
    )
    list_filter = ("state", "is_overrun", "is_late")
    search_fields = ("request_id",)
    list_select_related = ("account",)
    date_hierarchy = "created_at"
    readonly_fields = ("amount_display", "settled_display")
    exclude = ("amount", "settled_amount")

    @admin.display(description="held", ordering="amount")
    def amount_display(self, hold: Hold) -> str:
        return money_display(hold.amount)

    @admin.display(description="settled", ordering="settled_amount")
    def settled_display(self, hold: Hold) -> str:
        return money_display(hold.settled_amount)

    @admin.display(description="age", ordering="-created_at")
    def age(self, hold: Hold) -> str:
        end = hold.resolved_at or timezone.now()
        return duration_display(end - hold.created_at)

    @admin.display(description="expiry", ordering="expires_at")
    def expiry(self, hold: Hold) -> str:
        now = timezone.now()
        if hold.state != Hold.State.ACTIVE:
            return f"{hold.state}"
        if hold.expires_at > now:
            return f"in {duration_display(hold.expires_at - now)}"
        return f"overdue by {duration_display(now - hold.expires_at)}"


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "request_id",
        "account",
        "model_alias",
        "endpoint",
        "stream",
        "input_tokens",
        "output_tokens",
        "cost_display",
        "status",
        "estimated",
        "started_at",
    )
    list_filter = ("status", "stream", "estimated", "endpoint")
    search_fields = ("request_id",)
    list_select_related = ("account",)
    date_hierarchy = "started_at"
    exclude = ("cost",)
    readonly_fields = ("cost_display",)

    @admin.display(description="cost", ordering="cost")
    def cost_display(self, record: UsageRecord) -> str:
        return money_display(record.cost)


# The price catalogue and statements (billing/admin_catalogue.py): its admin classes register there.
import billing.admin_catalogue  # noqa: E402, F401

# Payments (billing/payments/admin.py): events, checkouts and links, auto top-ups, alert deliveries.
from billing.payments import admin as _payments_admin  # noqa: E402, F401
