"""How the services call the money engine (billing/sql/, the billing_engine schema).

Every money operation is one statement, `SELECT * FROM billing_engine.<operation>(...)`. It goes
through a plain psycopg cursor with server-side binding: parameters travel separately and
psycopg prepares the statement on a pooled connection the first time it runs there, after
which PostgreSQL only binds and executes it. (Django's cursors interpolate on the client, so
every call would be parsed and planned again.) Results come back in binary: psycopg decodes
them in C (Django's text loader for timestamptz is Python), and a jsonb column arrives
decoded, as the ORM's JSONField gives it.

The same statement runs from sync code (`sql_rows`, in the caller's transaction or in
autocommit, where one call is one durable transaction) and from the event loop
(`sql_rows_async`, over a small pool of async autocommit connections), so the gateway's common
hold and settle need no thread. The services map the rows the same way for both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from psycopg_pool import AsyncConnectionPool

logger = logging.getLogger(__name__)

Rows = Sequence[tuple[Any, ...]]

# The engine's versioned SQL files (installed and replaced by migrations).
ENGINE_SQL_DIR = Path(__file__).resolve().parent / "sql"


def engine_sql(name: str) -> str:
    """One version of the engine, as its migration runs it."""
    return (ENGINE_SQL_DIR / name).read_text()


def engine_call(function: str, arguments: Sequence[str]) -> str:
    """`SELECT * FROM billing_engine.<function>(%(a)s, ...)`: one operation's statement."""
    placeholders = ", ".join(f"%({name})s" for name in arguments)
    return f"SELECT * FROM billing_engine.{function}({placeholders})"  # noqa: S608 - names are ours


def sql_rows(statement: str, params: Mapping[str, Any]) -> Rows:
    """Run one statement that returns rows, in the caller's transaction, or outside one as its
    own: one engine call is then one durable transaction. Errors are Django's
    (IntegrityError, OperationalError, ...), as from any cursor."""
    db = connections[DEFAULT_DB_ALIAS]  # one lookup: each through the proxy costs one
    db.ensure_connection()
    with db.wrap_database_errors:
        with psycopg.Cursor(db.connection) as cursor:
            # Prepared on first use: these are the few statements every request runs.
            cursor.execute(statement, params, prepare=True, binary=True)
            return cursor.fetchall()


def sql_batches(
    statement: str,
    params: Mapping[str, Any],
    *,
    batch_size: int,
    max_batches: int | None,
    next_params: Callable[[tuple[Any, ...]], Mapping[str, Any]],
    count: Callable[[tuple[Any, ...]], int],
) -> list[tuple[Any, ...]]:
    """Run a batch statement (one row back per batch) until a batch comes back short. Each
    batch is its own transaction, so memory and lock time do not grow with the work."""
    results: list[tuple[Any, ...]] = []
    batch_params = {**params, "limit": batch_size}
    while max_batches is None or len(results) < max_batches:
        [row] = sql_rows(statement, batch_params)
        results.append(row)
        if count(row) < batch_size:
            break
        batch_params = {**batch_params, **next_params(row)}
    return results


ASYNC_POOL_TIMEOUT_SECONDS = 5
# How these connections show in pg_stat_activity.
ASYNC_APPLICATION_NAME = "billing-gateway-async"

_async_pools: dict[asyncio.AbstractEventLoop, asyncio.Future[AsyncConnectionPool]] = {}


async def sql_rows_async(statement: str, params: Mapping[str, Any]) -> Rows:
    """Run one statement that returns rows as its own transaction, on the running event loop.
    Errors are psycopg's.

    A connection the database dropped while it sat idle in the pool (a restart, a failover)
    fails its statement at once: then the pool's idle connections are checked, the dead ones
    dropped, and the statement runs once more on a live one. Only a broken connection is
    retried, never a refusal or a lock timeout; every engine call is idempotent by its request
    id or key, so a first try that committed before its connection went cannot count twice.
    """
    pool = await _async_pool()
    try:
        return await _pooled_rows(pool, statement, params)
    except psycopg.OperationalError as exc:
        if not isinstance(exc, _BrokenConnection):
            raise
        logger.warning("async database connection lost while idle; retrying on a fresh one")
        await pool.check()
    return await _pooled_rows(pool, statement, params)


class _BrokenConnection(psycopg.OperationalError):
    """The statement failed because its connection is gone (not because of what it asked)."""


async def _pooled_rows(
    pool: AsyncConnectionPool, statement: str, params: Mapping[str, Any]
) -> Rows:
    # getconn/putconn rather than pool.connection(): its context manager adds a generator and
    # the connection's own commit-or-rollback block, which an autocommit statement never needs.
    # putconn still resets or discards a connection an error or a cancellation left unusable.
    conn = await pool.getconn()
    try:
        cursor = await conn.execute(statement, params, prepare=True, binary=True)
        return await cursor.fetchall()
    except psycopg.OperationalError as exc:
        if conn.broken or conn.closed:
            raise _BrokenConnection(str(exc)) from exc
        raise
    finally:
        await pool.putconn(conn)


async def _async_pool() -> AsyncConnectionPool:
    """This event loop's pool: Django's connection parameters (database, adapters, prepared
    statements), autocommit. No health check per checkout: a broken connection fails its
    statement, the caller falls back to the sync path, and the pool drops the connection."""
    loop = asyncio.get_running_loop()
    opening = _async_pools.get(loop)
    if opening is None:
        # A task, so that requests arriving while it opens all wait for the one pool.
        opening = _async_pools[loop] = asyncio.ensure_future(_async_pool_open())
    try:
        return await opening
    except Exception:
        _async_pools.pop(loop, None)  # the next request tries again
        raise


async def _async_pool_open() -> AsyncConnectionPool:
    params = connections["default"].get_connection_params()
    params.pop("cursor_factory", None)  # Django's sync cursor class
    pool = AsyncConnectionPool(
        kwargs={**params, "autocommit": True, "application_name": ASYNC_APPLICATION_NAME},
        min_size=1,
        max_size=settings.GATEWAY_ASYNC_DB_CONNECTIONS,
        # Waiting longer for one of these is pointless: the sync path is the fallback.
        timeout=min(ASYNC_POOL_TIMEOUT_SECONDS, settings.DB_POOL_TIMEOUT_SECONDS),
        open=False,
    )
    await pool.open()
    return pool


async def sql_async_pool_close() -> None:
    """Close this event loop's pool, if it has one (its loop is ending: tests, shutdown)."""
    opening = _async_pools.pop(asyncio.get_running_loop(), None)
    if opening is not None:
        await (await opening).close()
