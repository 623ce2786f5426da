"""The money core's hot statements on PostgreSQL: server-side binding, prepared per connection.

Django's psycopg cursors bind parameters client-side (the whole statement is interpolated in
Python and parsed and planned by PostgreSQL on every call). The few fixed statements a request
runs (hold, settle) go through a plain psycopg cursor on the same connection and transaction
instead: parameters travel separately and psycopg prepares each statement on a pooled
connection the first time it runs there, after which PostgreSQL only binds and executes it.

A hot statement that is a whole billing step runs as its own transaction
(`one_statement_transaction`): in autocommit, without the BEGIN and COMMIT round trips.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from django.db import connection, transaction


def sql_rows(statement: str, params: Mapping[str, Any]) -> Sequence[tuple[Any, ...]]:
    """Run one statement that returns rows, in the current transaction. Errors are Django's
    (IntegrityError, OperationalError, ...), as from any Django cursor."""
    connection.ensure_connection()
    with connection.wrap_database_errors:
        with psycopg.Cursor(connection.connection) as cursor:
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
