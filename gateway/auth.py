"""API key authentication for DRF: `Authorization: Bearer <key>` or `x-api-key: <key>`."""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from billing.models import ApiKey
from gateway.selectors import api_key_authenticate


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
    def authenticate(self, request: Request) -> tuple[None, ApiKey]:
        # Raises a 401 GatewayError; every gateway request must carry a key. Uncached: these
        # read endpoints have no hold to re-check a key revoked a moment ago.
        try:
            api_key = api_key_authenticate(
                secret=request_secret(request), now=timezone.now(), cached=False
            )
            return None, api_key
        finally:
            # The lookup's connection goes back to the pool at once, not when the view ends.
            connection.close()

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"
