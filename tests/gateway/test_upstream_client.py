"""The upstream client's one aiohttp session per process is shared by every customer's
requests: it must not keep what one upstream response set for the next request."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.upstreams.client import UpstreamCall, upstream_session


async def _cookie_echo(request: web.Request) -> web.Response:
    # Like a provider behind a CDN: sets a cookie, and says whether it was sent one.
    response = web.json_response({"cookie_sent": request.headers.get("Cookie")})
    response.set_cookie("cdn_session", "customer-a")
    return response


async def _two_calls() -> list[object]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _cookie_echo)
    seen = []
    async with TestServer(app, host="127.0.0.1") as server:
        for _ in range(2):
            call = await UpstreamCall.open(
                # A host name: aiohttp's default jar keeps no cookies for bare IP addresses.
                url=f"http://localhost:{server.port}/v1/chat/completions",
                headers={"Content-Type": "application/json"},
                body={"model": "m"},
                timeout=aiohttp.ClientTimeout(total=5),
            )
            seen.append((await call.read_json())["cookie_sent"])
        await upstream_session().close()
    return seen


def test_a_cookie_set_by_one_upstream_response_is_not_sent_with_the_next_request() -> None:
    assert asyncio.run(_two_calls()) == [None, None]
