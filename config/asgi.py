"""The ASGI application: /v1/ (the gateway) and everything else (admin, health, metrics).

All are Django handlers over the same URLconf. The gateway's carry only the gateway's own async
middleware (gateway/handler.py): one for the completion endpoints, which never use the
database in the request's own thread, and one for the rest of /v1/. The site's carries the
full MIDDLEWARE list.
"""

import gc
import os
from typing import Any

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# The admin's CSS and JS are served by Django's own static handler (only paths under STATIC_URL).
site_application = ASGIStaticFilesHandler(get_asgi_application())

# These need the apps loaded above.
from gateway.handler import CompletionASGIHandler, GatewayASGIHandler  # noqa: E402
from gateway.urls import COMPLETION_PATHS  # noqa: E402

completion_application = CompletionASGIHandler()
gateway_application = GatewayASGIHandler()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope.get("path", "")
    if scope["type"] == "http" and path in COMPLETION_PATHS:
        await completion_application(scope, receive, send)
    elif scope["type"] == "http" and path.startswith("/v1/"):
        await gateway_application(scope, receive, send)
    else:
        await site_application(scope, receive, send)


# What is loaded by now lives as long as the process: take it out of the cyclic GC's reach, so a
# full collection no longer walks it (36 ms here before, 16 ms after, every request waiting).
gc.freeze()
