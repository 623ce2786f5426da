"""The Celery app (`celery -A config worker`)."""

import os

from celery import Celery
from celery.signals import worker_process_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_shutdown.connect
def _metrics_forget_child(pid: int | None = None, **kwargs: object) -> None:
    # A prefork child exiting: drop its live gauge files (counters keep their totals).
    from config.metrics import metrics_process_dead

    metrics_process_dead(pid=pid or os.getpid())
