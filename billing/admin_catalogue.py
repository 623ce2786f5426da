"""The price catalogue and statements in the finance admin: provider prices (read-only: set by
`set_provider_price` or by accepting a proposal), the proposals an import made (accepted or
rejected through a confirmation page that shows the difference from the price in force, each
decision a StaffAction), and issued statements (read-only, with their PDF)."""

from __future__ import annotations

from typing import Any

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

from billing.admin import MemoForm, ReadOnlyAdmin, money_display
from billing.catalogue import prices_compare, provider_price_select
from billing.errors import BillingError
from billing.models import ProviderPrice, ProviderPriceProposal, Statement
from billing.services.tariffs import provider_price_proposal_decide

DECISIONS = {"accept": "Accept", "reject": "Reject"}


@admin.register(ProviderPrice)
class ProviderPriceAdmin(ReadOnlyAdmin):
    list_display = (
        "model",
        "provider",
        "valid_from",
        "valid_until",
        "input_price",
        "output_price",
        "source",
    )
    list_filter = ("provider", "model")
    list_select_related = ("model",)
    search_fields = ("model__alias",)
    date_hierarchy = "valid_from"

    @admin.display(description="input / Mtok")
    def input_price(self, price: ProviderPrice) -> str:
        return money_display(price.input_per_mtok)

    @admin.display(description="output / Mtok")
    def output_price(self, price: ProviderPrice) -> str:
        return money_display(price.output_per_mtok)


@admin.register(ProviderPriceProposal)
class ProviderPriceProposalAdmin(ReadOnlyAdmin):
    list_display = (
        "model",
        "provider",
        "catalogue_model",
        "status",
        "input_change",
        "output_change",
        "created_at",
        "decided_by",
    )
    list_filter = ("status", "provider")
    list_select_related = ("model", "decided_by")
    search_fields = ("model__alias", "catalogue_model")
    actions = ["accept", "reject"]
    show_facets = admin.ShowFacets.ALWAYS

    def has_decide_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("billing.decide_providerpriceproposal")

    def _change(self, proposal: ProviderPriceProposal, token_class: str) -> str:
        current = provider_price_select(model_alias=proposal.model.alias, at=timezone.now())
        [change] = [
            row
            for row in prices_compare(
                current=None if current is None else current.price, proposed=proposal.price
            )
            if row.token_class == token_class
        ]
        return format_html(
            "{} → {}{}",
            "none" if change.current is None else money_display(change.current),
            money_display(change.proposed),
            f" ({change.percent:+}%)" if change.percent is not None else "",
        )

    @admin.display(description="input / Mtok (now → proposed)")
    def input_change(self, proposal: ProviderPriceProposal) -> str:
        return self._change(proposal, "input")

    @admin.display(description="output / Mtok (now → proposed)")
    def output_change(self, proposal: ProviderPriceProposal) -> str:
        return self._change(proposal, "output")

    def _decide_redirect(self, queryset: QuerySet[ProviderPriceProposal], decision: str) -> Any:
        ids = ",".join(str(pk) for pk in queryset.order_by("pk").values_list("pk", flat=True))
        url = reverse("admin:billing_providerpriceproposal_decide", args=[decision])
        return redirect(f"{url}?{urlencode({'ids': ids})}")

    @admin.action(permissions=["decide"], description="Accept selected provider prices…")
    def accept(self, request: HttpRequest, queryset: QuerySet[ProviderPriceProposal]) -> Any:
        return self._decide_redirect(queryset, "accept")

    @admin.action(permissions=["decide"], description="Reject selected provider prices…")
    def reject(self, request: HttpRequest, queryset: QuerySet[ProviderPriceProposal]) -> Any:
        return self._decide_redirect(queryset, "reject")

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "decide/<str:decision>/",
                self.admin_site.admin_view(self.decide_view),
                name="billing_providerpriceproposal_decide",
            ),
            *super().get_urls(),
        ]

    def decide_view(self, request: HttpRequest, decision: str) -> HttpResponse:
        """Confirm accepting or rejecting proposals: each beside the price in force, class by
        class, and a memo; one StaffAction per proposal."""
        if decision not in DECISIONS:
            raise Http404("no such decision")
        if not self.has_decide_permission(request):
            raise PermissionDenied
        raw_ids = request.POST.get("ids") if request.method == "POST" else request.GET.get("ids")
        ids = [int(part) for part in (raw_ids or "").split(",") if part.strip().isdigit()]
        proposals = list(
            ProviderPriceProposal.objects.filter(pk__in=ids).select_related("model").order_by("pk")
        )
        if not proposals:
            raise Http404("no such proposals")
        form = MemoForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            decided, refused = [], []
            for proposal in proposals:
                try:
                    provider_price_proposal_decide(
                        proposal_id=proposal.pk,
                        accept=decision == "accept",
                        user=request.user,  # type: ignore[arg-type]
                        memo=form.cleaned_data["memo"],
                        now=timezone.now(),
                    )
                except BillingError as exc:
                    refused.append(str(exc))
                else:
                    decided.append(proposal.model.alias)
            if decided:
                self.message_user(
                    request,
                    f"{DECISIONS[decision]}ed the provider price of {', '.join(decided)}.",
                    messages.SUCCESS,
                )
            for reason in refused:
                self.message_user(request, f"Nothing changed: {reason}.", messages.WARNING)
            return redirect("admin:billing_providerpriceproposal_changelist")
        now = timezone.now()
        rows = []
        for proposal in proposals:
            current = provider_price_select(model_alias=proposal.model.alias, at=now)
            rows.append(
                {
                    "proposal": proposal,
                    "current": current,
                    "changes": prices_compare(
                        current=None if current is None else current.price,
                        proposed=proposal.price,
                    ),
                }
            )
        return TemplateResponse(
            request,
            "admin/billing/providerpriceproposal/decide_confirm.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": f"{DECISIONS[decision]} provider prices: confirm",
                "decision": decision,
                "decision_label": DECISIONS[decision],
                "rows": rows,
                "ids": ",".join(str(proposal.pk) for proposal in proposals),
                "form": form,
            },
        )


@admin.register(Statement)
class StatementAdmin(ReadOnlyAdmin):
    list_display = ("account", "month", "issued_at", "closing_balance", "pdf_link")
    list_filter = ("month",)
    list_select_related = ("account",)
    search_fields = ("account__name", "=account__id")
    date_hierarchy = "month"
    exclude = ("pdf",)
    readonly_fields = ("account", "month", "issued_at", "figures", "pdf_link")

    @admin.display(description="closing balance")
    def closing_balance(self, statement: Statement) -> str:
        return str(statement.figures.get("closing_balance", ""))

    @admin.display(description="PDF")
    def pdf_link(self, statement: Statement) -> str:
        url = reverse("admin:billing_statement_pdf", args=[statement.pk])
        return format_html('<a href="{}">PDF</a>', url)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:statement_id>/pdf/",
                self.admin_site.admin_view(self.pdf_view),
                name="billing_statement_pdf",
            ),
            *super().get_urls(),
        ]

    def pdf_view(self, request: HttpRequest, statement_id: int) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        statement = Statement.objects.filter(pk=statement_id).first()
        if statement is None:
            raise Http404("no such statement")
        response = HttpResponse(bytes(statement.pdf), content_type="application/pdf")
        response["Content-Disposition"] = (
            f'inline; filename="statement-{statement.month:%Y-%m}-{statement.account_id}.pdf"'
        )
        return response
