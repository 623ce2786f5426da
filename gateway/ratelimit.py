"""Per-key rate limits: requests per minute (`ApiKey.rpm`) and billed tokens per minute
(`ApiKey.tpm`), checked by the pipeline after authentication and parsing, before the hold.

- Requests: a moving window (limits' `acquire_entry`): at most rpm requests in any 60 s, a
  burst of rpm allowed. A request is counted when it is admitted; one then refused for its
  tokens still counts, as OpenAI counts unsuccessful requests.
- Tokens: what a request was billed (input plus output) is counted when it settles, on a
  sliding window counter (limits' `acquire_sliding_window_entry`: this minute's count plus the
  previous minute's, weighted by how much of it is still within the last 60 s). It costs the
  same whatever the tpm; a moving window would keep one entry per token. A request is refused
  while the tokens counted so far are at or above the tpm.

The windows live in Redis when REDIS_URL is set, shared by every process and host; without it
(the embedded default) in this process's memory, so each process enforces the limits on its
own. Keys without limits never get here (no round trip). If Redis fails or does not answer
within GATEWAY_RATELIMIT_TIMEOUT_SECONDS, the request goes through unlimited (fail open: a
rate-limit store must not take the gateway down), logged and counted in
gateway_ratelimit_unavailable_total, and the store is not tried again for
RETRY_AFTER_FAILURE_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from django.conf import settings
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.errors import StorageError
from limits.storage import storage_from_string

from billing import metrics
from billing.models import ApiKey
from gateway.errors import GatewayError

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
RETRY_AFTER_FAILURE_SECONDS = 1.0
# The token counter's own limit: counting a settled request's tokens must never be refused.
_TOKENS_CEILING = 10**15

# (previous window's count, its seconds to live, current window's count, its seconds to live),
# as limits' get_sliding_window gives it. The current window is "this minute" while it has
# more than WINDOW_SECONDS to live, then the previous one, fading out until it expires.
SlidingWindow = tuple[int, float, int, float]

# limits' async storages with both windows: Redis, or this process's memory.
_RateLimitStorage = RedisStorage | MemoryStorage


_storages: dict[asyncio.AbstractEventLoop, _RateLimitStorage] = {}
_unavailable_until = 0.0


def _storage() -> _RateLimitStorage | None:
    """This event loop's storage (redis-py's asyncio client belongs to one loop), or None
    while the store is being given a rest after a failure."""
    if time.monotonic() < _unavailable_until:
        return None
    loop = asyncio.get_running_loop()
    storage = _storages.get(loop)
    if storage is None:
        storage = _storages[loop] = _storage_new()
    return storage


def _storage_new() -> _RateLimitStorage:
    if not settings.REDIS_URL:
        storage = storage_from_string("async+memory://")
    else:
        timeout = settings.GATEWAY_RATELIMIT_TIMEOUT_SECONDS
        storage = storage_from_string(
            f"async+{settings.REDIS_URL}",
            implementation="redispy",
            key_prefix="gateway-ratelimit",
            wrap_exceptions=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
    assert isinstance(storage, RedisStorage | MemoryStorage)
    return storage


def _failures(storage: Storage) -> tuple[type[BaseException], ...]:
    base = storage.base_exceptions
    return (StorageError, TimeoutError, OSError, *(base if isinstance(base, tuple) else (base,)))


def _unavailable(exc: BaseException, *, step: str) -> None:
    global _unavailable_until
    _unavailable_until = time.monotonic() + RETRY_AFTER_FAILURE_SECONDS
    metrics.RATELIMIT_UNAVAILABLE.labels(step).inc()
    logger.warning(
        "rate-limit store unavailable (%s: %s); requests go through unlimited for %.0f s",
        step,
        type(exc).__name__,
        RETRY_AFTER_FAILURE_SECONDS,
    )


def duration(seconds: float) -> str:
    """OpenAI's format for x-ratelimit-reset-*: "20ms", "1s", "17.468s", "6m0s"."""
    seconds = max(0.0, round(seconds, 3))
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    if not minutes:
        return f"{rest:g}s"
    return f"{int(minutes)}m{round(rest, 3):g}s"


def tokens_counted(window: SlidingWindow, *, after: float = 0.0) -> int:
    """The tokens a sliding window counts `after` seconds from when it was read (limits'
    weighting: the previous minute's count by the share of it still within the last 60 s)."""
    previous, previous_ttl, current, current_ttl = window
    if current_ttl - after > WINDOW_SECONDS:  # the current window is still this minute's
        return math.floor(previous * max(0.0, previous_ttl - after) / WINDOW_SECONDS + current)
    return math.floor(current * max(0.0, current_ttl - after) / WINDOW_SECONDS)


def tokens_below_in(window: SlidingWindow, *, limit: int) -> int:
    """Whole seconds until the window counts fewer than `limit` tokens (0: it does now)."""
    for seconds in range(2 * WINDOW_SECONDS + 1):
        if tokens_counted(window, after=seconds) < limit:
            return seconds
    return 2 * WINDOW_SECONDS


@dataclass
class KeyRateLimits:
    """A limited key's windows as its request's check found them; the request carries it to
    its settle, which counts its tokens, and to its response headers."""

    name: str  # the key's identity in the store
    rpm: int | None
    tpm: int | None
    requests_remaining: int = 0
    requests_reset: float = 0.0  # seconds until a request slot frees
    tokens_used: int = 0  # counted in the last 60 s (this request's too, once settled)
    tokens_reset: float = 0.0  # seconds until every counted token has left the window
    tokens_retry: int = 0  # seconds until the count falls below the tpm

    @property
    def requests_key(self) -> str:
        return f"requests/{self.name}"

    @property
    def tokens_key(self) -> str:
        return f"tokens/{self.name}"

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for each limit the key has."""
        headers: dict[str, str] = {}
        if self.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(self.rpm)
            headers["x-ratelimit-remaining-requests"] = str(self.requests_remaining)
            headers["x-ratelimit-reset-requests"] = duration(self.requests_reset)
        if self.tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(self.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, self.tpm - self.tokens_used))
            headers["x-ratelimit-reset-tokens"] = duration(self.tokens_reset)
        return headers

    async def take(self, storage: _RateLimitStorage) -> str | None:
        """Count this request and read both windows; the limit it is refused by, if any."""
        tokens_window, admitted = await asyncio.gather(
            self._tokens_window(storage), self._request_admit(storage)
        )
        if self.rpm is not None:
            oldest, count = await storage.get_moving_window(
                self.requests_key, self.rpm, WINDOW_SECONDS
            )
            self.requests_remaining = max(0, self.rpm - count)
            self.requests_reset = max(0.0, oldest + WINDOW_SECONDS - time.time()) if count else 0.0
        if tokens_window is not None and self.tpm is not None:
            previous, previous_ttl, current, current_ttl = tokens_window
            self.tokens_used = tokens_counted(tokens_window)
            self.tokens_reset = current_ttl if current else previous_ttl if previous else 0.0
            self.tokens_retry = tokens_below_in(tokens_window, limit=self.tpm)
        if not admitted:
            return "requests"
        if self.tpm is not None and self.tokens_used >= self.tpm:
            return "tokens"
        return None

    async def _request_admit(self, storage: _RateLimitStorage) -> bool:
        if self.rpm is None:
            return True
        return await storage.acquire_entry(self.requests_key, self.rpm, WINDOW_SECONDS)

    async def _tokens_window(self, storage: _RateLimitStorage) -> SlidingWindow | None:
        if self.tpm is None:
            return None
        return await storage.get_sliding_window(self.tokens_key, WINDOW_SECONDS)

    def refusal(self, limit: str) -> GatewayError:
        """The provider-shaped 429 (OpenAI's type is the limit: "requests" or "tokens")."""
        if limit == "requests":
            retry = self.requests_reset
            detail = f"requests per min (RPM): Limit {self.rpm}, Used {self.rpm}, Requested 1"
        else:
            retry = self.tokens_retry
            detail = f"tokens per min (TPM): Limit {self.tpm}, Used {self.tokens_used}"
        return GatewayError(
            429,
            f"Rate limit reached for this API key on {detail}. "
            f"Please try again in {duration(retry)}.",
            limit,
            "rate_limit_exceeded",
            headers={"retry-after": str(max(1, math.ceil(retry))), **self.headers()},
        )


async def ratelimit_check(*, api_key: ApiKey) -> KeyRateLimits | None:
    """Admit a request of `api_key` or raise its 429 GatewayError. None for a key without
    limits, or when the store is unavailable (fail open)."""
    if api_key.rpm is None and api_key.tpm is None:
        return None
    storage = _storage()
    if storage is None:
        metrics.RATELIMIT_UNAVAILABLE.labels("skipped").inc()
        return None
    limits = KeyRateLimits(name=api_key.prefix, rpm=api_key.rpm, tpm=api_key.tpm)
    try:
        async with asyncio.timeout(settings.GATEWAY_RATELIMIT_TIMEOUT_SECONDS):
            refused_by = await limits.take(storage)
    except _failures(storage) as exc:
        _unavailable(exc, step="check")
        return None
    if refused_by is not None:
        metrics.RATELIMIT_REFUSALS.labels(refused_by).inc()
        raise limits.refusal(refused_by)
    return limits


async def ratelimit_count(limits: KeyRateLimits | None, *, tokens: int) -> None:
    """Count a settled request's billed tokens against its key's tpm (never refused: they
    were used)."""
    if limits is None or limits.tpm is None or tokens <= 0:
        return
    storage = _storage()
    if storage is None:
        metrics.RATELIMIT_UNAVAILABLE.labels("skipped").inc()
        return
    try:
        async with asyncio.timeout(settings.GATEWAY_RATELIMIT_TIMEOUT_SECONDS):
            await storage.acquire_sliding_window_entry(
                limits.tokens_key, _TOKENS_CEILING, WINDOW_SECONDS, tokens
            )
    except _failures(storage) as exc:
        _unavailable(exc, step="count")
        return
    limits.tokens_used += tokens
    # Counted into this minute: gone from the window within two minutes at the most.
    limits.tokens_reset = limits.tokens_reset or 2.0 * WINDOW_SECONDS


async def ratelimit_clear(*, api_key: ApiKey) -> None:
    """Forget a key's windows (operators and tests: a fresh minute for the key)."""
    storage = _storage()
    if storage is None:
        return
    limits = KeyRateLimits(name=api_key.prefix, rpm=api_key.rpm, tpm=api_key.tpm)
    await storage.clear(limits.requests_key)
    await storage.clear_sliding_window(limits.tokens_key, WINDOW_SECONDS)
