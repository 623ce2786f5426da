"""Who may call what under /v1/: the key's scope."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from billing.models import ApiKey
from gateway.errors import GatewayError


class AdminScopeKey(BasePermission):
    """The account's self-service endpoints take a key of scope `admin`; an inference key is
    refused with a provider-shaped 403 (its account's other keys are its owner's business)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        api_key = request.auth
        if isinstance(api_key, ApiKey) and api_key.scope == ApiKey.Scope.ADMIN:
            return True
        raise GatewayError(
            403,
            "This endpoint needs an API key of scope 'admin'.",
            "permission_error",
            "insufficient_scope",
        )
