"""The money core's hot statements on PostgreSQL: server-side binding, prepared per connection.

Django's psycopg cursors bind parameters client-side (the whole statement is interpolated in
Python and parsed and planned by PostgreSQL on every call). The few fixed statements a request
runs (hold, settle) go through a plain psycopg cursor on the same connection and transaction
instead: parameters travel separately and psycopg prepares each statement on a pooled
connection the first time it runs there, after which PostgreSQL only binds and executes it.

A hot statement that is a whole billing step runs as its own transaction
(`one_statement_transaction`): in autocommit, without the BEGIN and COMMIT round trips.

The gateway runs those whole-step statements from its event loop (`sql_rows_async`), over a
small pool of async autocommit connections, so the common hold and settle cost no hand-off to
a thread and back. Whatever they cannot decide goes to the sync services, in threads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from psycopg_pool import AsyncConnectionPool


@functools.cache
def on_postgresql() -> bool:
    """Whether the default database is PostgreSQL: fixed for the process. (Django's
    `connection` proxy looks the thread's or task's connection up on every attribute read,
    a measurable share of a request on the event loop.)"""
    return connections[DEFAULT_DB_ALIAS].vendor == "postgresql"


def sql_rows(statement: str, params: Mapping[str, Any]) -> Sequence[tuple[Any, ...]]:
    """Run one statement that returns rows, in the current transaction. Errors are Django's
    (IntegrityError, OperationalError, ...), as from any Django cursor."""
    db = connections[DEFAULT_DB_ALIAS]  # one lookup: each through the proxy costs one
    db.ensure_connection()
    with db.wrap_database_errors:
        with psycopg.Cursor(db.connection) as cursor:
            # Prepared on first use: these are the few statements every request runs.
            cursor.execute(statement, params, prepare=True)
            return cursor.fetchall()  # each statement here returns rows (RETURNING or SELECT)


@contextmanager
def one_statement_transaction() -> Iterator[None]:
    """For a single statement that is a whole outer service's transaction: autocommit makes it
    atomic and durable by itself. Inside a caller's atomic block (tests) a savepoint instead,
    with durable's check, so a failed statement leaves the caller's transaction usable."""
    if connection.in_atomic_block:
        with transaction.atomic(durable=True):
            yield
    else:
        yield


ASYNC_POOL_TIMEOUT_SECONDS = 5
# How these connections show in pg_stat_activity.
ASYNC_APPLICATION_NAME = "billing-gateway-async"

_async_pools: dict[asyncio.AbstractEventLoop, asyncio.Future[AsyncConnectionPool]] = {}


async def sql_rows_async(statement: str, params: Mapping[str, Any]) -> Sequence[tuple[Any, ...]]:
    """Run one statement that returns rows as its own transaction, on the running event loop
    (PostgreSQL only). Errors are psycopg's: the caller's fallback is the sync path."""
    pool = await _async_pool()
    # getconn/putconn rather than pool.connection(): its context manager adds a generator and
    # the connection's own commit-or-rollback block, which an autocommit statement never needs.
    # putconn still resets or discards a connection an error or a cancellation left unusable.
    conn = await pool.getconn()
    try:
        cursor = await conn.execute(statement, params, prepare=True)
        return await cursor.fetchall()
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
