"""The API's OpenAPI 3 schema (drf-spectacular) and its Swagger UI page: no key needed, every
/v1/ endpoint in it, both ways of sending the key, the provider error shapes. (bin/schema_check
runs schemathesis against a live gateway with it.)"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.views import APIView

from config.asgi import application


def _get(path: str) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []
    done = asyncio.Event()
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(application(scope, receive, send))
    headers = {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def _schema() -> dict[str, Any]:
    status, headers, body = _get("/v1/openapi.json")
    assert status == 200, body
    assert "json" in headers["content-type"]
    return json.loads(body)


def _api_routes(patterns: list[Any], prefix: str = "") -> set[str]:
    """Every DRF view's route under v1/ in the URLconf, as the schema writes paths
    (`<int:key_id>` as `{key_id}`)."""
    routes: set[str] = set()
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            routes |= _api_routes(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern) and route.startswith("v1/"):
            view = getattr(pattern.callback, "cls", None)
            if view is not None and issubclass(view, APIView):
                routes.add("/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route))
    return routes


def test_the_schema_needs_no_key_and_covers_every_v1_endpoint() -> None:
    paths = set(_schema()["paths"])

    expected = _api_routes(get_resolver().url_patterns) - {"/v1/openapi.json", "/v1/docs"}
    assert {"/v1/chat/completions", "/v1/messages", "/v1/billing/balance"} <= expected
    assert expected <= paths
    assert all(path.startswith("/v1/") for path in paths)


def test_both_ways_of_sending_the_key_are_alternatives_on_every_keyed_operation() -> None:
    schema = _schema()

    assert schema["components"]["securitySchemes"] == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "Authorization: Bearer <key>, as the openai SDK sends it.",
        },
        "apiKeyAuth": {
            "type": "apiKey",
            "in": "header",
            "name": "x-api-key",
            "description": "x-api-key: <key>, as the anthropic SDK sends it.",
        },
    }
    for path in ("/v1/chat/completions", "/v1/messages"):
        assert schema["paths"][path]["post"]["security"] == [
            {"bearerAuth": []},
            {"apiKeyAuth": []},
        ]
    assert schema["paths"]["/v1/billing/balance"]["get"]["security"] == [
        {"bearerAuth": []},
        {"apiKeyAuth": []},
    ]


def _ref(response: dict[str, Any], media_type: str = "application/json") -> str:
    return str(response["content"][media_type]["schema"]["$ref"]).rsplit("/", 1)[-1]


def test_completion_operations_document_bodies_streams_and_provider_errors() -> None:
    schema = _schema()
    components = schema["components"]["schemas"]
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    messages = schema["paths"]["/v1/messages"]["post"]

    body = components[_ref(chat["requestBody"])]
    assert {"model", "messages"} <= set(body["required"])
    assert "max_completion_tokens" in body["properties"]
    assert "max_tokens" in components[_ref(messages["requestBody"])]["required"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    for status in ("400", "401", "402", "404", "413", "429", "503"):
        assert _ref(chat["responses"][status]) == "OpenAIError"
        assert _ref(messages["responses"][status]) == "AnthropicError"
    assert set(components["OpenAIError"]["properties"]) == {"error"}
    assert set(components["AnthropicError"]["properties"]) == {"type", "error"}
    assert "500" not in chat["responses"]


def test_every_operation_documents_the_common_errors() -> None:
    for path, operations in _schema()["paths"].items():
        for operation in operations.values():
            assert {"400", "401", "408", "413", "503"} <= set(operation["responses"]), path


def test_the_docs_page_needs_no_key_and_loads_the_schema() -> None:
    status, headers, body = _get("/v1/docs")

    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"/v1/openapi.json" in body
    assert b"swagger-ui" in body
    # Its assets come from this server (the sidecar package), not a CDN: the docs work offline.
    assert b"cdn.jsdelivr.net" not in body
    assets = re.findall(rb'src="(/static/[^"]+\.js)"', body)
    assert assets
    for asset in assets:
        asset_status, _, script = _get(asset.decode())
        assert asset_status == 200 and script
