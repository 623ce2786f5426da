"""Sentry error reporting, on only when SENTRY_DSN is set.

Events leave the process scrubbed: no API key, no Authorization header, no prompt and no
completion. `event_scrub` is the `before_send` (and `before_send_transaction`) hook and is
tested on its own with a capturing transport (tests/reconciliation/test_metrics_health.py).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, cast

import sentry_sdk
from sentry_sdk.consts import ClientConstructor
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.django import DjangoIntegration
from sentry_sdk.types import Event, Hint

API_KEY_PATTERN = re.compile(r"sk-gw-[A-Za-z0-9_-]+")
REDACTED = "[redacted]"
SECRET_HEADERS = frozenset(
    {"authorization", "x-api-key", "proxy-authorization", "cookie", "set-cookie", "api-key"}
)
# Request and response bodies of an LLM API are the customer's prompts and completions.
CONTENT_KEYS = frozenset(
    {
        "messages",
        "prompt",
        "content",
        "completion",
        "choices",
        "input",
        "system",
        "text",
        "data",
        "body",
    }
)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return API_KEY_PATTERN.sub(REDACTED, value)
    if isinstance(value, dict):
        return {
            key: REDACTED if _is_secret_key(key) else _scrub(item) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


def _is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return lowered in SECRET_HEADERS or lowered in CONTENT_KEYS


def event_scrub(event: Event, hint: Hint | None = None) -> Event:
    """Drop request bodies and secret headers, then mask anything shaped like an API key."""
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("data", None)
        request.pop("cookies", None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {
                name: REDACTED if name.lower() in SECRET_HEADERS else value
                for name, value in headers.items()
            }
    # Frame locals, breadcrumbs, extra and messages may all quote a key or a prompt.
    return cast(Event, _scrub(event))


def _privacy_options() -> dict[str, Any]:
    """Collect no user data, no bodies, no frame variables. Newer SDKs replace
    send_default_pii with data_collection (and warn about the old flag); older ones lack it."""
    if "data_collection" in inspect.signature(ClientConstructor.__init__).parameters:
        return {
            "data_collection": {
                "user_info": False,
                "cookies": {"mode": "off"},
                "http_bodies": [],
                "url_query_params": {"mode": "off"},
                "gen_ai": {"inputs": False, "outputs": False},
                "database_query_data": False,
                "stack_frame_variables": False,
            }
        }
    return {
        "send_default_pii": False,
        "include_local_variables": False,
        "max_request_body_size": "never",
    }


def sentry_init(*, dsn: str, environment: str = "", release: str = "", **options: Any) -> None:
    """Start the SDK. `options` lets tests pass a capturing `transport`."""
    sentry_sdk.init(
        dsn=dsn,
        environment=environment or None,
        release=release or None,
        integrations=[DjangoIntegration(), CeleryIntegration(monitor_beat_tasks=True)],
        before_send=event_scrub,
        before_send_transaction=event_scrub,
        traces_sample_rate=0.0,
        **_privacy_options(),
        **options,
    )
