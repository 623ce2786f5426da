"""The reconciliation queue, the staff-action log and the finance dashboard in the admin.

Every money action goes through a confirmation page with a memo and is carried out by
reconciliation.services.finance, which records the StaffAction in the same transaction.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode

from billing.admin import ReadOnlyAdmin, money_display
from billing.errors import BillingError
from billing.models import LedgerTransaction
from billing.money import money_str
from reconciliation.models import ReconciliationItem, StaffAction
from reconciliation.selectors import dashboard_get, item_action_preview
from reconciliation.services.finance import ITEM_ACTIONS

ACTION_LABELS = {
    "retry": "Retry the settle now",
    "charge": "Charge the usage",
    "write_off": "Write off",
    "resolve": "Resolve with a note",
}
CHART_WIDTH = 720
CHART_HEIGHT = 200


class MemoForm(forms.Form):
    memo = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))

    def clean_memo(self) -> str:
        memo = self.cleaned_data["memo"].strip()
        if not memo:
            raise forms.ValidationError("A memo is required.")
        return memo


def _item_action(name: str) -> Any:
    @admin.action(permissions=["reconcile"], description=f"{ACTION_LABELS[name]}…")
    def action(
        modeladmin: ReconciliationItemAdmin,
        request: HttpRequest,
        queryset: QuerySet[ReconciliationItem],
    ) -> Any:
        ids = ",".join(str(pk) for pk in queryset.order_by("pk").values_list("pk", flat=True))
        url = reverse("admin:reconciliation_reconciliationitem_confirm", args=[name])
        return redirect(f"{url}?{urlencode({'ids': ids})}")

    action.__name__ = name
    return action


@admin.register(ReconciliationItem)
class ReconciliationItemAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "status",
        "request_id",
        "account",
        "key_prefix",
        "model_alias",
        "cost_display",
        "held_display",
        "attempts",
        "created_at",
        "resolved_by",
        "resolved_at",
    )
    list_filter = ("kind", "status")
    show_facets = admin.ShowFacets.ALWAYS
    search_fields = ("request_id", "key_prefix")
    list_select_related = ("account", "resolved_by")
    date_hierarchy = "created_at"
    actions = [_item_action(name) for name in ACTION_LABELS]
    exclude = ("cost", "held_amount")
    readonly_fields = ("cost_display", "held_display", "transaction_link")

    def has_reconcile_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("reconciliation.reconcile_item")

    @admin.display(description="cost", ordering="cost")
    def cost_display(self, item: ReconciliationItem) -> str:
        return money_display(item.cost)

    @admin.display(description="held", ordering="held_amount")
    def held_display(self, item: ReconciliationItem) -> str:
        return money_display(item.held_amount)

    @admin.display(description="posting")
    def transaction_link(self, item: ReconciliationItem) -> str:
        if item.transaction_id is None:
            return "—"
        url = reverse("admin:billing_ledgertransaction_change", args=[item.transaction_id])
        return format_html('<a href="{}">transaction #{}</a>', url, item.transaction_id)

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path(
                "dashboard/",
                wrap(self.dashboard_view),
                name="reconciliation_reconciliationitem_dashboard",
            ),
            path(
                "confirm/<str:action>/",
                wrap(self.confirm_view),
                name="reconciliation_reconciliationitem_confirm",
            ),
            *super().get_urls(),
        ]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        buttons = []
        item = (
            ReconciliationItem.objects.filter(pk=object_id).first() if object_id.isdigit() else None
        )
        if (
            item is not None
            and item.status == ReconciliationItem.Status.PENDING
            and self.has_reconcile_permission(request)
        ):
            for name, label in ACTION_LABELS.items():
                url = reverse("admin:reconciliation_reconciliationitem_confirm", args=[name])
                buttons.append((f"{url}?{urlencode({'ids': item.pk})}", label))
        return super().change_view(
            request, object_id, form_url, {**(extra_context or {}), "item_actions": buttons}
        )

    def _context(self, request: HttpRequest, title: str, **more: Any) -> dict[str, Any]:
        return {**self.admin_site.each_context(request), "opts": self.opts, "title": title, **more}

    def confirm_view(self, request: HttpRequest, action: str) -> HttpResponse:
        if not self.has_reconcile_permission(request):
            raise PermissionDenied
        if action not in ITEM_ACTIONS:
            raise Http404("no such action")
        raw_ids = request.POST.get("ids") if request.method == "POST" else request.GET.get("ids")
        ids = [int(part) for part in (raw_ids or "").split(",") if part.strip().isdigit()]
        items = list(ReconciliationItem.objects.filter(pk__in=ids).select_related("account"))
        if not items:
            raise Http404("no such items")

        form = MemoForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            service = ITEM_ACTIONS[action]
            now = timezone.now()
            for item in items:
                try:
                    result = service(
                        item_id=item.pk,
                        user=request.user,  # type: ignore[arg-type]
                        memo=form.cleaned_data["memo"],
                        now=now,
                    )
                except BillingError as exc:
                    self.message_user(request, f"Item #{item.pk}: {exc}", messages.ERROR)
                    continue
                txn = result.transaction_id
                if action == "retry":
                    note = "settle queued"
                elif txn is None:
                    note = "no money moved"
                else:
                    kind = LedgerTransaction.objects.values_list("kind", flat=True).get(pk=txn)
                    note = (
                        f"posted {kind} transaction #{txn}"
                        if result.posted
                        else f"already posted as {kind} #{txn}; nothing new charged"
                    )
                self.message_user(request, f"Item #{item.pk}: {note}.", messages.SUCCESS)
            return redirect("admin:reconciliation_reconciliationitem_changelist")

        return TemplateResponse(
            request,
            "admin/reconciliation/reconciliationitem/confirm.html",
            self._context(
                request,
                f"{ACTION_LABELS[action]}: confirm",
                action=action,
                action_label=ACTION_LABELS[action],
                previews=item_action_preview(items=items, action=action),
                ids=",".join(str(item.pk) for item in items),
                form=form,
            ),
        )

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        figures = dashboard_get(now=timezone.now())
        changelist = reverse("admin:reconciliation_reconciliationitem_changelist")
        return TemplateResponse(
            request,
            "admin/reconciliation/dashboard.html",
            self._context(
                request,
                "Reconciliation dashboard",
                figures=figures,
                money=money_str,
                failures_url=f"{changelist}?kind__exact=deduction_failure&status__exact=pending",
                expired_url=f"{changelist}?kind__exact=expired_hold&status__exact=pending",
                mismatches_url=f"{changelist}?kind__exact=audit_mismatch&status__exact=pending",
                failures_cost=money_str(figures.deduction_failures.cost),
                expired_cost=money_str(figures.expired_holds.cost),
                expired_held=money_str(figures.expired_holds.held),
                revenue_total=money_str(figures.revenue_total),
                chart=revenue_chart(figures.revenue_by_day),
            ),
        )


def revenue_chart(days: list[tuple[Any, Decimal]]) -> dict[str, Any]:
    """Bar geometry for the server-rendered SVG chart (no JavaScript: machines are offline)."""
    peak = max((amount for _, amount in days), default=Decimal(0))
    slot = CHART_WIDTH / max(len(days), 1)
    bars = []
    for index, (day, amount) in enumerate(days):
        # Pixel geometry only, still in Decimal so no float ever meets an amount.
        height = (
            (amount / peak * (CHART_HEIGHT - 20)).quantize(Decimal("0.1"))
            if peak > 0
            else Decimal(0)
        )
        bars.append(
            {
                "x": round(index * slot + 2, 1),
                "y": CHART_HEIGHT - height,
                "width": round(slot - 4, 1),
                "height": height,
                "day": day,
                "amount": money_str(amount),
                "label": index % 5 == 0 or index == len(days) - 1,
                "label_x": round(index * slot + slot / 2, 1),
            }
        )
    return {
        "bars": bars,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "peak": money_str(peak),
        "total_height": CHART_HEIGHT + 24,
    }


@admin.register(StaffAction)
class StaffActionAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "user", "action", "target", "memo", "transaction_link")
    list_filter = ("action",)
    search_fields = ("target", "memo", "user__username")
    date_hierarchy = "created_at"
    list_select_related = ("user",)

    @admin.display(description="transaction")
    def transaction_link(self, staff_action: StaffAction) -> str:
        if staff_action.transaction_id is None:
            return "—"
        url = reverse("admin:billing_ledgertransaction_change", args=[staff_action.transaction_id])
        return format_html('<a href="{}">#{}</a>', url, staff_action.transaction_id)
