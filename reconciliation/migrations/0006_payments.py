"""The Finance group's permissions for payments: webhook events, checkouts, auto top-ups and
alert deliveries (view only: they change through the services); and the payments relay's
schedule in django-celery-beat (the outbox: alerts and auto top-ups, every 10 seconds)."""

import json

from django.contrib.auth.management import create_permissions
from django.db import migrations

# Frozen here on purpose: a migration must not change meaning when app code changes later.
FINANCE_PERMISSIONS = (
    ("billing", "view_paymentevent"),
    ("billing", "view_checkout"),
    ("billing", "add_checkout"),  # "create a checkout link" for a customer (no money moves)
    ("billing", "view_autotopupattempt"),
    ("billing", "view_notification"),
    ("billing", "view_notificationdelivery"),
    ("billing", "view_deliveryattempt"),
    ("billing", "set_auto_topup"),
    ("billing", "set_alerts"),
)
RELAY_NAME = "Deliver payment alerts and auto top-ups"


def _permissions(apps):
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Permission = apps.get_model("auth", "Permission")
    for app_label, codename in FINANCE_PERMISSIONS:
        permission = Permission.objects.filter(
            content_type__app_label=app_label, codename=codename
        ).first()
        if permission is not None:
            yield permission


def payments_install(apps, schema_editor):
    group, _ = apps.get_model("auth", "Group").objects.get_or_create(name="Finance")
    group.permissions.add(*_permissions(apps))
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    interval, _ = IntervalSchedule.objects.get_or_create(every=10, period="seconds")
    PeriodicTask.objects.get_or_create(
        name=RELAY_NAME,
        defaults={"task": "billing.payments_relay", "kwargs": json.dumps({}), "enabled": True,
                  "interval": interval, "expire_seconds": 9},
    )


def payments_remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=RELAY_NAME).delete()
    group = apps.get_model("auth", "Group").objects.filter(name="Finance").first()
    if group is not None:
        group.permissions.remove(*_permissions(apps))


class Migration(migrations.Migration):
    dependencies = [
        ("reconciliation", "0005_queue_engine"),
        ("billing", "0010_payments"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(payments_install, payments_remove)]
