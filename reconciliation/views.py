"""Probes for the orchestrator: /healthz (the process answers) and /readyz (it can work)."""

from __future__ import annotations

import logging

from django.db import connections
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from config.celery import app as celery_app

logger = logging.getLogger(__name__)

BROKER_TIMEOUT_SECONDS = 2
DATABASE_TIMEOUT_SECONDS = 2.0


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: no dependency is checked, so a database outage never restarts web processes."""
    return JsonResponse({"status": "ok"})


def _server_version(number: int) -> str:
    """libpq's server_version (180001) as PostgreSQL prints it (18.1)."""
    return f"{number // 10000}.{number % 10000}"


def _database_check() -> tuple[str | None, str | None]:
    """(error class or None, the server's version or None)."""
    database = connections["default"]
    pool = getattr(database, "pool", None)
    try:
        if pool is not None:
            # Straight from the pool with a short wait: the pool's own timeout (10 s) would
            # make the probe hang for as long as the database is down.
            pool.open()  # as Django does on first use; a no-op once open
            with pool.connection(timeout=DATABASE_TIMEOUT_SECONDS) as conn:
                conn.execute("SELECT 1").fetchone()
                version = conn.info.server_version
        else:
            with database.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
            version = database.connection.info.server_version
    except Exception as exc:
        logger.warning("readiness: database unreachable: %s", exc)
        return type(exc).__name__, None
    return None, _server_version(version)


def _broker_check() -> str | None:
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_SECONDS
            )
    except Exception as exc:
        logger.warning("readiness: broker unreachable: %s", exc)
        return type(exc).__name__
    return None


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: the database answers SELECT 1 and the broker accepts a connection.
    Only the error's class is shown: the probe is public and messages can name hosts.
    The database is always PostgreSQL; its version is shown when it answers."""
    database_error, database_version = _database_check()
    checks = {"database": database_error, "broker": _broker_check()}
    ready = all(error is None for error in checks.values())
    body = {
        "status": "ok" if ready else "unavailable",
        "checks": {name: "ok" if error is None else error for name, error in checks.items()},
        "database": "postgresql",
        "database_version": database_version,
    }
    return JsonResponse(body, status=200 if ready else 503)
