"""Writes for upstreams and routes (the admin and the operator commands call these)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction

from billing.errors import InvalidAmount
from billing.models import LanguageModel
from gateway.models import Route, Upstream
from gateway.selectors import model_context_forget


@transaction.atomic(durable=True)
def upstream_add(*, name: str, kind: str, base_url: str, api_key_env: str = "") -> Upstream:
    """Create or update the upstream called `name`."""
    if kind not in Upstream.Kind.values:
        raise InvalidAmount(f"unknown upstream kind {kind!r} (openai or anthropic)")
    try:
        URLValidator(schemes=["http", "https"])(base_url)
    except ValidationError as exc:
        raise InvalidAmount(f"invalid base URL {base_url!r}") from exc
    upstream, _ = Upstream.objects.update_or_create(
        name=name.strip(),
        defaults={"kind": kind, "base_url": base_url.rstrip("/"), "api_key_env": api_key_env},
    )
    return upstream


@transaction.atomic(durable=True)
def model_route_set(
    *, alias: str, upstream_name: str, upstream_model: str = "", max_output_tokens: int = 4096
) -> Route:
    """Point a model alias at an upstream (creating the model entry if needed)."""
    if max_output_tokens < 1:
        raise InvalidAmount("max output tokens must be at least 1")
    upstream = Upstream.objects.filter(name=upstream_name).first()
    if upstream is None:
        raise InvalidAmount(f"no upstream named {upstream_name!r}")
    model, _ = LanguageModel.objects.get_or_create(alias=alias.strip())
    route, _ = Route.objects.update_or_create(
        model=model,
        defaults={
            "upstream": upstream,
            "upstream_model": upstream_model or alias,
            "max_output_tokens": max_output_tokens,
        },
    )
    # This process sees the change at once; others within the cache TTL.
    transaction.on_commit(lambda: model_context_forget(alias=model.alias))
    return route
