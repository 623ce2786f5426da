"""Install the default periodic work in django-celery-beat (editable later in the admin).

get_or_create by task name: re-running never duplicates a schedule, and a schedule staff
edited (or disabled) is left as they left it.
"""

import json

from django.db import migrations

# name -> (task, schedule, options). Frozen here: a migration must not change with app code.
DEFAULT_TASKS = {
    "Expire holds past their TTL": (
        "reconciliation.expire_holds",
        {"interval": {"every": 1, "period": "minutes"}},
        # A run that waited longer than its period is dropped: the next one does its work.
        {"expire_seconds": 55},
    ),
    "Audit the ledger": (
        "reconciliation.audit_ledger",
        {"crontab": {"minute": "0", "hour": "3", "day_of_week": "*", "day_of_month": "*",
                     "month_of_year": "*", "timezone": "UTC"}},
        {},
    ),
    "Roll over key budget periods": (
        "reconciliation.budgets_roll",
        {"interval": {"every": 10, "period": "minutes"}},
        {"expire_seconds": 540},
    ),
}


def beat_schedules_install(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, (task, schedule, options) in DEFAULT_TASKS.items():
        defaults = {"task": task, "kwargs": json.dumps({}), "enabled": True, **options}
        if "interval" in schedule:
            defaults["interval"], _ = IntervalSchedule.objects.get_or_create(**schedule["interval"])
        else:
            defaults["crontab"], _ = CrontabSchedule.objects.get_or_create(**schedule["crontab"])
        PeriodicTask.objects.get_or_create(name=name, defaults=defaults)


def beat_schedules_remove(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name__in=list(DEFAULT_TASKS)).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("reconciliation", "0002_finance_group"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(beat_schedules_install, beat_schedules_remove)]
