"""API key authentication for DRF: `Authorization: Bearer <key>` or `x-api-key: <key>`.

DRF runs authenticators synchronously (adrf's async views too, in the request's thread), so a
lookup here may use the database: its connection goes back to the pool before the view runs.
"""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from billing.models import ApiKey
from gateway.selectors import api_key_authenticate, api_key_from_cache


def key_secret(*, authorization: str, x_api_key: str) -> str:
    """The key from the two headers' values (absent: empty)."""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return x_api_key.strip()


def request_secret(request: HttpRequest | Request) -> str:
    # From META: request.headers would build a dict of every header, for these two.
    return key_secret(
        authorization=request.META.get("HTTP_AUTHORIZATION", ""),
        x_api_key=request.META.get("HTTP_X_API_KEY", ""),
    )


class ApiKeyAuthentication(BaseAuthentication):
    """The request's key. Every gateway request must carry one: none, or one that is not
    active, is a 401 GatewayError (gateway/errors.py shapes it).

    Read from the database, unless the view says `api_key_cached = True` (the completion
    views): then the key as this process last read it, within GATEWAY_KEY_CACHE_TTL_SECONDS,
    without the database. A revoked key is still refused at once there: the hold re-checks
    the key in its own statement, whatever the cache says. A read has no hold to do that, so
    the read views look the key up every time."""

    def authenticate(self, request: Request) -> tuple[None, ApiKey]:
        secret = request_secret(request)
        now = timezone.now()
        cached = getattr(request.parser_context.get("view"), "api_key_cached", False)
        if cached:
            api_key = api_key_from_cache(secret=secret, now=now)
            if api_key is not None:
                return None, api_key
        try:
            return None, api_key_authenticate(secret=secret, now=now, cached=cached)
        finally:
            # The lookup's connection goes back to the pool at once, not when the request ends.
            connection.close()

    @staticmethod
    def cached_key(request: Request) -> ApiKey | None:
        """The request's key from this process's cache, without the database (callable on the
        event loop): None when the cache does not know it; a 401 GatewayError when it knows
        it revoked or expired."""
        return api_key_from_cache(secret=request_secret(request), now=timezone.now())

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"
