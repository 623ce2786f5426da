"""Upstreams and routes in the admin: added and changed by finance through gateway/services.py
(each with its StaffAction, via reconciliation.services.onboarding), never written here.

A route is flagged when its upstream names an API-key environment variable this server does
not have (its requests would go out without a credential) and when its model has no current
general tariff (its requests are refused, or billed at the default price if one is set).
"""

from __future__ import annotations

import os
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.utils.html import format_html

from billing.admin import memo_field, memo_required
from billing.errors import InvalidAmount
from billing.selectors import tariff_current_exists
from gateway.models import Route, Upstream
from gateway.services import route_check, upstream_check


def upstream_key_problem(upstream: Upstream) -> str:
    """Why the upstream's requests would carry no credential, or "" if they would."""
    if upstream.api_key_env and not os.environ.get(upstream.api_key_env):
        return (
            f"the API-key variable {upstream.api_key_env} is not set in this server's "
            "environment: requests would go out without a credential"
        )
    return ""


def route_problems(route: Route) -> list[str]:
    """What is wrong with a route, for its list column and its change page."""
    problems = []
    key_problem = upstream_key_problem(route.upstream)
    if key_problem:
        problems.append(f"upstream {route.upstream.name}: {key_problem}")
    if not getattr(route, "has_tariff", True):
        problems.append(
            f"model {route.model.alias} has no current tariff: its requests are refused "
            "(or billed at the default price, if one is set)"
        )
    return problems


class MemoFormMixin(forms.Form):
    """The memo every staff change needs (a Form, so ModelForms collect its field)."""

    memo = memo_field("Why this change: recorded as a staff action.")

    def clean_memo(self) -> str:
        return memo_required(self.cleaned_data["memo"])


class UpstreamForm(MemoFormMixin, forms.ModelForm):
    base_url = forms.URLField(
        max_length=500,
        assume_scheme="https",
        help_text="openai: including /v1 (https://api.openai.com/v1); anthropic: without it "
        "(https://api.anthropic.com).",
    )

    class Meta:
        model = Upstream
        fields = (
            "name",
            "kind",
            "base_url",
            "api_key_env",
            "connect_timeout_seconds",
            "read_timeout_seconds",
        )
        help_texts = {
            "api_key_env": "The environment variable holding the provider's key (the key itself "
            "is never stored). Empty: requests carry no credential.",
        }

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        fields = ("name", "kind", "base_url", "connect_timeout_seconds", "read_timeout_seconds")
        if all(name in data for name in fields):
            try:
                upstream_check(
                    upstream_id=self.instance.pk,
                    name=data["name"],
                    kind=data["kind"],
                    base_url=data["base_url"],
                    api_key_env=data.get("api_key_env", ""),
                    connect_timeout_seconds=data["connect_timeout_seconds"],
                    read_timeout_seconds=data["read_timeout_seconds"],
                )
            except InvalidAmount as exc:
                raise forms.ValidationError(str(exc)) from exc
        return data


class RouteForm(MemoFormMixin, forms.ModelForm):
    alias = forms.CharField(
        max_length=200, label="Model alias", help_text="The model name clients ask for."
    )

    class Meta:
        model = Route
        fields = ("alias", "upstream", "upstream_model", "max_output_tokens")
        help_texts = {
            "upstream_model": "The provider's model name. Empty: the alias.",
            "max_output_tokens": "Used when a client sends no max_tokens, and the largest it "
            "may ask for.",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["upstream_model"].required = False
        if self.instance.pk:
            self.fields["alias"].initial = self.instance.model.alias

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "alias" in data and "max_output_tokens" in data:
            try:
                route_check(
                    route_id=self.instance.pk,
                    alias=data["alias"],
                    max_output_tokens=data["max_output_tokens"],
                )
            except InvalidAmount as exc:
                raise forms.ValidationError(str(exc)) from exc
        return data


class ServiceSavedAdmin(admin.ModelAdmin):
    """Add and change through a service (in the admin's own atomic block, with its LogEntry);
    nothing is deleted here: a route's model or an upstream's routes depend on it."""

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Upstream)
class UpstreamAdmin(ServiceSavedAdmin):
    form = UpstreamForm
    list_display = ("name", "kind", "base_url", "api_key_env", "credential")
    list_filter = ("kind",)
    search_fields = ("name", "base_url")

    @admin.display(description="credential")
    def credential(self, upstream: Upstream) -> str:
        problem = upstream_key_problem(upstream)
        if problem:
            return format_html('<span class="flag" title="{}">variable unset</span>', problem)
        return "set" if upstream.api_key_env else "none sent"

    def save_model(self, request: HttpRequest, obj: Upstream, form: Any, change: bool) -> None:
        # Import here: reconciliation depends on gateway's services, not the other way round.
        from reconciliation.services.onboarding import upstream_save_by_staff

        data = form.cleaned_data
        saved = upstream_save_by_staff(
            upstream_id=obj.pk if change else None,
            name=data["name"],
            kind=data["kind"],
            base_url=data["base_url"],
            api_key_env=data["api_key_env"],
            connect_timeout_seconds=data["connect_timeout_seconds"],
            read_timeout_seconds=data["read_timeout_seconds"],
            user=request.user,  # type: ignore[arg-type]
            memo=data["memo"],
            now=timezone.now(),
        )
        # The admin logs and redirects with `obj` (the form's unsaved copy): give it the row.
        obj.pk = saved.pk

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        upstream = self.get_object(request, object_id)
        problems = [upstream_key_problem(upstream)] if upstream is not None else []
        return super().change_view(
            request,
            object_id,
            form_url,
            {**(extra_context or {}), "problems": [p for p in problems if p]},
        )


@admin.register(Route)
class RouteAdmin(ServiceSavedAdmin):
    form = RouteForm
    list_display = ("model", "upstream", "upstream_model", "max_output_tokens", "flags")
    list_filter = ("upstream",)
    list_select_related = ("model", "upstream")
    search_fields = ("model__alias", "upstream_model")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Route]:
        return (
            super()
            .get_queryset(request)
            .select_related("model", "upstream")
            .annotate(has_tariff=tariff_current_exists(model_ref="model_id", at=timezone.now()))
        )

    @admin.display(description="flags")
    def flags(self, route: Route) -> str:
        problems = route_problems(route)
        if not problems:
            return "—"
        return format_html(
            '<span class="flag" title="{}">{}</span>',
            "; ".join(problems),
            ", ".join(
                label
                for label, bad in (
                    ("API-key variable unset", bool(upstream_key_problem(route.upstream))),
                    ("no tariff", not getattr(route, "has_tariff", True)),
                )
                if bad
            ),
        )

    def save_model(self, request: HttpRequest, obj: Route, form: Any, change: bool) -> None:
        # Import here: reconciliation depends on gateway's services, not the other way round.
        from reconciliation.services.onboarding import route_save_by_staff

        data = form.cleaned_data
        saved = route_save_by_staff(
            route_id=obj.pk if change else None,
            alias=data["alias"],
            upstream_id=data["upstream"].pk,
            upstream_model=data["upstream_model"],
            max_output_tokens=data["max_output_tokens"],
            user=request.user,  # type: ignore[arg-type]
            memo=data["memo"],
            now=timezone.now(),
        )
        # The admin logs and redirects with `obj` (the form's unsaved copy): give it the row.
        obj.pk = saved.pk
        obj.model = saved.model

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        route = self.get_object(request, object_id)
        problems = route_problems(route) if route is not None else []
        return super().change_view(
            request, object_id, form_url, {**(extra_context or {}), "problems": problems}
        )
