"""Writes for upstreams and routes (the admin and the operator commands call these)."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction

from billing.errors import InvalidAmount
from billing.models import LanguageModel
from gateway.models import Route, Upstream
from gateway.selectors import model_context_forget

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@transaction.atomic(durable=True)
def upstream_add(*, name: str, kind: str, base_url: str, api_key_env: str = "") -> Upstream:
    """Create or update the upstream called `name` (the add_upstream command)."""
    upstream, _ = Upstream.objects.update_or_create(
        name=name.strip(),
        defaults={
            "kind": kind,
            "base_url": _base_url_checked(kind=kind, base_url=base_url),
            "api_key_env": api_key_env,
        },
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


def _base_url_checked(*, kind: str, base_url: str) -> str:
    if kind not in Upstream.Kind.values:
        raise InvalidAmount(f"unknown upstream kind {kind!r} (openai or anthropic)")
    try:
        URLValidator(schemes=["http", "https"])(base_url)
    except ValidationError as exc:
        raise InvalidAmount(f"invalid base URL {base_url!r}") from exc
    return base_url.rstrip("/")


def _routes_forget(aliases: list[str]) -> None:
    # This process sees the change at once; others within the cache TTL.
    for alias in aliases:
        model_context_forget(alias=alias)


def upstream_check(
    *,
    upstream_id: int | None,
    name: str,
    kind: str,
    base_url: str,
    api_key_env: str,
    connect_timeout_seconds: int,
    read_timeout_seconds: int,
) -> str:
    """Raise InvalidAmount for settings `upstream_save` would refuse (the admin's form shows
    it on the field); return the base URL as it is stored."""
    if not name.strip():
        raise InvalidAmount("an upstream needs a name")
    checked_url = _base_url_checked(kind=kind, base_url=base_url)
    if api_key_env.strip() and not ENV_NAME.fullmatch(api_key_env.strip()):
        raise InvalidAmount(f"{api_key_env!r} is not an environment variable name")
    if connect_timeout_seconds < 1 or read_timeout_seconds < 1:
        raise InvalidAmount("timeouts must be at least 1 second")
    namesakes = Upstream.objects.filter(name=name.strip())
    if upstream_id is not None:
        namesakes = namesakes.exclude(pk=upstream_id)
    if namesakes.exists():
        raise InvalidAmount(f"an upstream named {name.strip()!r} exists already")
    return checked_url


def upstream_save(
    *,
    upstream_id: int | None,
    name: str,
    kind: str,
    base_url: str,
    api_key_env: str = "",
    connect_timeout_seconds: int = 10,
    read_timeout_seconds: int = 120,
) -> Upstream:
    """Create an upstream (`upstream_id` None) or change one, by id (the admin's forms).

    Not durable: the admin's change form runs it inside its own atomic block, with the
    StaffAction and its LogEntry; called alone it is the outermost transaction.
    """
    with transaction.atomic():
        if upstream_id is None:
            upstream = Upstream()
        else:
            found = Upstream.objects.select_for_update().filter(pk=upstream_id).first()
            if found is None:
                raise InvalidAmount(f"no upstream {upstream_id}")
            upstream = found
        upstream.base_url = upstream_check(
            upstream_id=upstream_id,
            name=name,
            kind=kind,
            base_url=base_url,
            api_key_env=api_key_env,
            connect_timeout_seconds=connect_timeout_seconds,
            read_timeout_seconds=read_timeout_seconds,
        )
        upstream.name = name.strip()
        upstream.kind = kind
        upstream.api_key_env = api_key_env.strip()
        upstream.connect_timeout_seconds = connect_timeout_seconds
        upstream.read_timeout_seconds = read_timeout_seconds
        upstream.save()
        aliases = list(upstream.routes.values_list("model__alias", flat=True))
        transaction.on_commit(lambda: _routes_forget(aliases))
    return upstream


def route_check(*, route_id: int | None, alias: str, max_output_tokens: int) -> None:
    """Raise InvalidAmount for a route `route_save` would refuse (the admin's form shows it)."""
    if not alias.strip():
        raise InvalidAmount("a route needs a model alias")
    if max_output_tokens < 1:
        raise InvalidAmount("max output tokens must be at least 1")
    routed = Route.objects.filter(model__alias=alias.strip())
    if route_id is not None:
        routed = routed.exclude(pk=route_id)
    if routed.exists():
        raise InvalidAmount(f"model {alias.strip()!r} is routed already")


def route_save(
    *,
    route_id: int | None,
    alias: str,
    upstream_id: int,
    upstream_model: str = "",
    max_output_tokens: int = 4096,
) -> Route:
    """Create a route (`route_id` None) or change one, by id (the admin's forms); the model
    alias is created if it is new. Not durable, like `upstream_save`."""
    alias = alias.strip()
    with transaction.atomic():
        route_check(route_id=route_id, alias=alias, max_output_tokens=max_output_tokens)
        upstream = Upstream.objects.filter(pk=upstream_id).first()
        if upstream is None:
            raise InvalidAmount(f"no upstream {upstream_id}")
        model, _ = LanguageModel.objects.get_or_create(alias=alias)
        if route_id is None:
            route = Route(model=model)
            forget = [alias]
        else:
            existing = (
                Route.objects.select_for_update().select_related("model").filter(pk=route_id)
            ).first()
            if existing is None:
                raise InvalidAmount(f"no route {route_id}")
            route = existing
            forget = sorted({route.model.alias, alias})
            route.model = model
        route.upstream = upstream
        route.upstream_model = upstream_model.strip() or alias
        route.max_output_tokens = max_output_tokens
        route.save()
        transaction.on_commit(lambda: _routes_forget(forget))
    return route
