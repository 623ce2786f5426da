"""The ASGI application: /v1/ (the gateway) and everything else (admin, health, metrics).

Both are Django handlers over the same URLconf; the gateway's carries only the gateway's own
async middleware (gateway/handler.py), the other the full MIDDLEWARE list.
"""

import os
from typing import Any

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# The admin's CSS and JS are served by Django's own static handler (only paths under STATIC_URL).
site_application = ASGIStaticFilesHandler(get_asgi_application())

from gateway.handler import GatewayASGIHandler  # noqa: E402 - needs the apps loaded above

gateway_application = GatewayASGIHandler()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
        await gateway_application(scope, receive, send)
    else:
        await site_application(scope, receive, send)
