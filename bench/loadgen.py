"""Closed-loop HTTP load generator (aiohttp, uvloop), run as its own process by the benchmarks.

Reads a JSON config on stdin, prints a JSON result on stdout:

    {"url": ..., "keys": ["sk-...", ...] or [], "body": {...}, "stream": false,
     "concurrency": 32, "requests": 2000, "warmup": 200, "anthropic": false}

`concurrency` workers each send requests back to back; worker i always uses keys[i % len]
(one key = all traffic on one account). Warm-up requests run first at the same concurrency and
are not measured (they are counted in `warmup_ok`, because the gateway bills them too).

Per request: latency (request sent -> body fully read) and time to first byte (for streams the
first body chunk, otherwise the response headers). A stream counts as ok only if it ended with
the protocol's closing event ([DONE] or message_stop).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

import aiohttp


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    data: bytes,
    stream: bool,
    end_marker: bytes,
) -> tuple[bool, int, float, float]:
    started = time.perf_counter()
    first = 0.0
    async with session.post(url, data=data, headers=headers) as resp:
        if not stream:
            first = time.perf_counter() - started
            body = await resp.read()
            ok = resp.status == 200 and body[:1] == b"{"
        else:
            tail = b""
            async for chunk in resp.content.iter_any():
                if not first:
                    first = time.perf_counter() - started
                tail = (tail + chunk)[-200:]
            ok = resp.status == 200 and end_marker in tail
        return ok, resp.status, time.perf_counter() - started, first


async def _phase(
    session: aiohttp.ClientSession, config: dict[str, Any], count: int, record: bool
) -> dict[str, Any]:
    url = config["url"]
    keys: list[str] = config.get("keys") or []
    stream = bool(config.get("stream"))
    anthropic = bool(config.get("anthropic"))
    end_marker = b"message_stop" if anthropic else b"[DONE]"
    data = json.dumps(config["body"]).encode()
    concurrency = int(config["concurrency"])
    remaining = count
    latencies: list[float] = []
    firsts: list[float] = []
    statuses: dict[str, int] = {}
    ok_count = 0

    async def worker(index: int) -> None:
        nonlocal remaining, ok_count
        headers = {"Content-Type": "application/json"}
        if keys:
            key = keys[index % len(keys)]
            headers["Authorization"] = f"Bearer {key}"
            if anthropic:
                headers["x-api-key"] = key
                headers["anthropic-version"] = "2023-06-01"
        while remaining > 0:
            remaining -= 1
            try:
                ok, status, latency, first = await _one(
                    session, url, headers, data, stream, end_marker
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if ok:
                ok_count += 1
                if record:
                    latencies.append(latency)
                    firsts.append(first)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "requests": count,
        "ok": ok_count,
        "statuses": statuses,
        "wall_seconds": wall,
        "rps": ok_count / wall if wall else 0.0,
        "p50_ms": _pct(latencies, 50) * 1000,
        "p99_ms": _pct(latencies, 99) * 1000,
        "mean_ms": (sum(latencies) / len(latencies) * 1000) if latencies else 0.0,
        "ttfb_p50_ms": _pct(firsts, 50) * 1000,
        "ttfb_p99_ms": _pct(firsts, 99) * 1000,
    }


async def main_async(config: dict[str, Any]) -> dict[str, Any]:
    concurrency = int(config["concurrency"])
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=float(config.get("timeout", 120)))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm = await _phase(session, config, int(config.get("warmup", 0)), record=False)
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        result = await _phase(session, config, int(config["requests"]), record=True)
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result["warmup_ok"] = warm["ok"]
    result["warmup_statuses"] = warm["statuses"]
    result["client_cpu_seconds"] = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )
    return result


def main() -> None:
    config = json.loads(sys.stdin.read())
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    result = asyncio.run(main_async(config))
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
