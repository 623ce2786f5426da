"""Per-request reads, cached in-process.

Routes and tariffs are cached for GATEWAY_CACHE_TTL_SECONDS (1 s): a changed route or price is
seen by every process within a second. API keys are cached for GATEWAY_KEY_CACHE_TTL_SECONDS
(10 s) for the completion endpoints, because the hold re-checks the key in its own statement:
a revoked or expired key is refused at once, and a key that gained a budget has its holds
counted. (A changed purpose or completion window prices requests within the TTL.) The read
endpoints look keys up uncached. The hold itself is always checked against the database.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from cachetools import TTLCache
from django.conf import settings

from billing import metrics
from billing.errors import ModelNotPriced
from billing.models import ApiKey, LanguageModel, ProviderPrice, Tariff
from billing.pricing import Price, provider_price_choose, tariff_choose
from billing.services.keys import api_key_hash
from gateway.errors import GatewayError
from gateway.models import Route
from gateway.upstreams.base import UpstreamTarget

logger = logging.getLogger(__name__)

_MISSING = object()

# A plain in-process TTL map: values are shared read-only objects, never pickled per read
# (Django's LocMemCache pickles on every get, a measurable share of a request's CPU).
_cache: TTLCache[str, Any] = TTLCache(maxsize=100_000, ttl=settings.GATEWAY_CACHE_TTL_SECONDS)
_key_cache: TTLCache[str, Any] = TTLCache(
    maxsize=100_000, ttl=settings.GATEWAY_KEY_CACHE_TTL_SECONDS
)
_cache_lock = threading.Lock()


def _peek(key: str, cache: TTLCache[str, Any] = _cache) -> Any:
    """The cached value, or _MISSING (no database: safe on the event loop)."""
    with _cache_lock:
        return cache.get(key, _MISSING)


def _cached(key: str, load: Callable[[], Any], cache: TTLCache[str, Any] = _cache) -> Any:
    value = _peek(key, cache)
    if value is _MISSING:
        value = load()
        with _cache_lock:
            cache[key] = value
    return value


def model_context_forget(*, alias: str) -> None:
    """Drop this process's cached route and tariffs for `alias` (others expire within a TTL)."""
    with _cache_lock:
        _cache.pop(f"model:{alias}", None)


def _key_digest(secret: str) -> str:
    if not secret:
        raise GatewayError(401, "Missing API key.", "invalid_request_error", "missing_api_key")
    return api_key_hash(secret)


def _key_checked(api_key: ApiKey | None, *, now: datetime) -> ApiKey:
    if api_key is None:
        raise GatewayError(401, "Invalid API key.", "invalid_request_error", "invalid_api_key")
    if api_key.status != ApiKey.Status.ACTIVE:
        raise GatewayError(
            401, "This API key has been revoked.", "invalid_request_error", "invalid_api_key"
        )
    if api_key.expires_at is not None and api_key.expires_at <= now:
        raise GatewayError(
            401, "This API key has expired.", "invalid_request_error", "invalid_api_key"
        )
    return api_key


def api_key_authenticate(*, secret: str, now: datetime, cached: bool = True) -> ApiKey:
    """The active, unexpired key for `secret`, or a 401 GatewayError."""
    digest = _key_digest(secret)
    load = ApiKey.objects.filter(secret_hash=digest).first
    return _key_checked(_cached(digest, load, _key_cache) if cached else load(), now=now)


def api_key_from_cache(*, secret: str, now: datetime) -> ApiKey | None:
    """api_key_authenticate without the database: None when this process has not seen the
    key within the TTL (callable on the event loop)."""
    api_key = _peek(_key_digest(secret), _key_cache)
    if api_key is _MISSING:
        return None
    return _key_checked(api_key, now=now)


@dataclass(frozen=True)
class ModelContext:
    alias: str
    target_kind: str
    base_url: str
    api_key_env: str
    upstream_model: str
    max_output_tokens: int
    connect_timeout: float
    read_timeout: float
    tariffs: tuple[Tariff, ...]  # the general ones and every account's negotiated ones
    provider_prices: tuple[ProviderPrice, ...] = ()

    def target(self) -> UpstreamTarget:
        return UpstreamTarget(
            kind=self.target_kind,
            base_url=self.base_url,
            api_key=os.environ.get(self.api_key_env, "") if self.api_key_env else "",
            upstream_model=self.upstream_model,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )


def _model_context_load(alias: str) -> ModelContext | None:
    route = Route.objects.select_related("upstream", "model").filter(model__alias=alias).first()
    if route is None:
        return None
    return ModelContext(
        alias=alias,
        target_kind=route.upstream.kind,
        base_url=route.upstream.base_url,
        api_key_env=route.upstream.api_key_env,
        upstream_model=route.upstream_model,
        max_output_tokens=route.max_output_tokens,
        connect_timeout=route.upstream.connect_timeout_seconds,
        read_timeout=route.upstream.read_timeout_seconds,
        tariffs=tuple(Tariff.objects.filter(model=route.model)),
        provider_prices=tuple(ProviderPrice.objects.filter(model=route.model)),
    )


def model_context_cached(*, alias: str) -> ModelContext | None:
    """The context if this process has it cached (no database read: safe on the event loop);
    None for a miss or an unknown model, which model_context_get then loads or refuses."""
    value = _peek(f"model:{alias}")
    return value if isinstance(value, ModelContext) else None


def model_context_get(*, alias: str) -> ModelContext:
    context = _cached(f"model:{alias}", lambda: _model_context_load(alias))
    if context is None:
        raise GatewayError(
            404,
            f"The model '{alias}' does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    return context


def _default_price() -> Price | None:
    if settings.BILLING_DEFAULT_INPUT_PER_MTOK and settings.BILLING_DEFAULT_OUTPUT_PER_MTOK:
        return Price(
            input_per_mtok=Decimal(settings.BILLING_DEFAULT_INPUT_PER_MTOK),
            output_per_mtok=Decimal(settings.BILLING_DEFAULT_OUTPUT_PER_MTOK),
        )
    return None


def price_select(*, context: ModelContext, api_key: ApiKey, at: datetime) -> Price:
    """The price for this key and model now (its account's negotiated tariff first); the
    default price (counted, logged) if allowed."""
    tariff = tariff_choose(
        context.tariffs,
        purpose=api_key.purpose,
        completion_window=api_key.completion_window,
        at=at,
        account_id=api_key.account_id,
    )
    if tariff is not None:
        return tariff.price
    default = _default_price()
    if default is None:
        raise ModelNotPriced(model_alias=context.alias)
    metrics.DEFAULT_PRICE_USED.inc()
    logger.warning("model %s has no tariff: billed at the default price", context.alias)
    return default


def provider_price_for(*, context: ModelContext, at: datetime) -> Price | None:
    """What the model costs us upstream at `at` (None: no provider price), from the cached
    context: no database read on the request's path."""
    chosen = provider_price_choose(context.provider_prices, at=at)
    return None if chosen is None else chosen.price


def routed_models() -> list[tuple[str, str, str]]:
    """(alias, upstream kind, upstream model) of every route: what the price import looks up."""
    return [
        (route.model.alias, route.upstream.kind, route.upstream_model)
        for route in Route.objects.select_related("model", "upstream").order_by("model__alias")
    ]


def models_for_key(*, api_key: ApiKey, at: datetime) -> list[str]:
    """Aliases this key can be billed for right now."""
    routed = LanguageModel.objects.filter(route__isnull=False).prefetch_related("tariffs")
    allow_default = _default_price() is not None
    return sorted(
        model.alias
        for model in routed
        if allow_default
        or tariff_choose(
            model.tariffs.all(),
            purpose=api_key.purpose,
            completion_window=api_key.completion_window,
            at=at,
            account_id=api_key.account_id,
        )
        is not None
    )
