"""Prometheus across several processes.

Each uvicorn worker and each Celery worker child keeps its own counters. With
PROMETHEUS_MULTIPROC_DIR set in the environment (before Python starts: prometheus_client reads
it at import), every process writes its values to files in that directory and `/metrics`
(django_prometheus' view) sums them with a MultiProcessCollector, so any web process answers
for all of them. Operators empty the directory before starting the processes (for example
`ExecStartPre=rm -rf $PROMETHEUS_MULTIPROC_DIR/*` then `mkdir -p`), or counters of a previous
run are added in.

Without the variable each process serves only its own counters (fine for one process and tests).
"""

from __future__ import annotations

import hmac
import os

from django.conf import settings
from django.http import HttpRequest, HttpResponse


def metrics_multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def metrics_process_dead(*, pid: int) -> None:
    """Forget a dead process' live gauges. Counters and histograms keep its totals, as they
    must: a restarted worker does not make money already counted disappear."""
    if not metrics_multiprocess_enabled():
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """/metrics (django_prometheus' exporter). It shows revenue and refusal counts, and is
    served on the API port: with METRICS_TOKEN set it needs `Authorization: Bearer <token>`,
    compared in constant time, and is a 401 without; unset, it is open (the quickstart, on
    loopback)."""
    from django_prometheus.exports import ExportToDjangoView  # only where /metrics is served

    token = settings.METRICS_TOKEN
    if token and not _bearer_matches(request.headers.get("Authorization", ""), token):
        response = HttpResponse("Unauthorized\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return ExportToDjangoView(request)


def _bearer_matches(authorization: str, token: str) -> bool:
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
