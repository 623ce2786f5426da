"""The money core's hot statements on PostgreSQL: server-side binding, prepared per connection.

Django's psycopg cursors bind parameters client-side (the whole statement is interpolated in
Python and parsed and planned by PostgreSQL on every call). The few fixed statements a request
runs (hold, settle) go through a plain psycopg cursor on the same connection and transaction
instead: parameters travel separately and psycopg prepares each statement once it has run five
times on a pooled connection, after which PostgreSQL only binds and executes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from django.db import connection


def sql_rows(statement: str, params: Mapping[str, Any]) -> Sequence[tuple[Any, ...]]:
    """Run one statement in the current transaction and return its rows. Errors are Django's
    (IntegrityError, OperationalError, ...), as from any Django cursor."""
    connection.ensure_connection()
    with connection.wrap_database_errors:
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description is not None else []
