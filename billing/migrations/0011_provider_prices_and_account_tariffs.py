"""Provider prices (what we pay upstream) and their review, each usage record's provider cost,
per-account tariffs, issued monthly statements; the Finance group's permissions for them, and
the beat schedule that issues last month's statements on the 1st."""

import json

import django.db.models.deletion
from django.conf import settings
from django.contrib.auth.management import create_permissions
from django.db import migrations, models

import billing.money

# Frozen here: a migration must not change meaning when app code changes later.
FINANCE_PERMISSIONS = (
    "view_providerprice",
    "view_providerpriceproposal",
    "decide_providerpriceproposal",
    "view_statement",
)
STATEMENT_SCHEDULE = "Issue last month's statements"


def finance_permissions_add(apps, schema_editor):
    # Permissions are normally created after all migrations (post_migrate); make them now.
    app_config = apps.get_app_config("billing")
    app_config.models_module = True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name="Finance")
    group.permissions.add(
        *Permission.objects.filter(
            content_type__app_label="billing", codename__in=FINANCE_PERMISSIONS
        )
    )


def finance_permissions_remove(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for group in Group.objects.filter(name="Finance"):
        group.permissions.remove(
            *Permission.objects.filter(
                content_type__app_label="billing", codename__in=FINANCE_PERMISSIONS
            )
        )


def statement_schedule_install(apps, schema_editor):
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    # 00:30 UTC on the 1st: last month is closed; a late settle of its requests posts into
    # the new month (statements go by posting time), so nothing is waited for.
    crontab, _ = CrontabSchedule.objects.get_or_create(
        minute="30",
        hour="0",
        day_of_week="*",
        day_of_month="1",
        month_of_year="*",
        timezone="UTC",
    )
    PeriodicTask.objects.get_or_create(
        name=STATEMENT_SCHEDULE,
        defaults={
            "task": "reconciliation.statements_issue",
            "kwargs": json.dumps({}),
            "enabled": True,
            "crontab": crontab,
        },
    )


def statement_schedule_remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(
        name=STATEMENT_SCHEDULE
    ).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0010_payments"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [
        migrations.AddField(
            model_name="tariff",
            name="account",
            field=models.ForeignKey(
                blank=True,
                help_text="Only for this customer (a negotiated price); empty: everyone's.",
                limit_choices_to={"kind": "customer"},
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="tariffs",
                to="billing.account",
            ),
        ),
        migrations.AddField(
            model_name="usagerecord",
            name="provider_cost",
            field=billing.money.MoneyField(blank=True, null=True),
        ),
        migrations.CreateModel(
            name="ProviderPrice",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("input_per_mtok", billing.money.MoneyField()),
                ("output_per_mtok", billing.money.MoneyField()),
                ("cached_input_per_mtok", billing.money.MoneyField(blank=True, null=True)),
                ("cache_write_per_mtok", billing.money.MoneyField(blank=True, null=True)),
                ("reasoning_per_mtok", billing.money.MoneyField(blank=True, null=True)),
                ("provider", models.CharField(blank=True, default="", max_length=64)),
                ("source", models.CharField(blank=True, default="", max_length=100)),
                ("valid_from", models.DateTimeField()),
                ("valid_until", models.DateTimeField(blank=True, null=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "model",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="provider_prices",
                        to="billing.languagemodel",
                    ),
                ),
            ],
        ),
        migrations.CreateModel(
            name="ProviderPriceProposal",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("input_per_mtok", billing.money.MoneyField()),
                ("output_per_mtok", billing.money.MoneyField()),
                ("cached_input_per_mtok", billing.money.MoneyField(blank=True, null=True)),
                ("cache_write_per_mtok", billing.money.MoneyField(blank=True, null=True)),
                ("reasoning_per_mtok", billing.money.MoneyField(blank=True, null=True)),
                ("provider", models.CharField(max_length=64)),
                ("catalogue_model", models.CharField(max_length=200)),
                ("source", models.CharField(max_length=100)),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("pending", "Pending"),
                            ("accepted", "Accepted"),
                            ("rejected", "Rejected"),
                            ("superseded", "Superseded"),
                        ],
                        default="pending",
                        max_length=16,
                    ),
                ),
                ("created_at", models.DateTimeField()),
                ("decided_at", models.DateTimeField(blank=True, null=True)),
                (
                    "accepted_price",
                    models.OneToOneField(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="proposal",
                        to="billing.providerprice",
                    ),
                ),
                (
                    "decided_by",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                (
                    "model",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="billing.languagemodel",
                    ),
                ),
            ],
            options={
                "permissions": [
                    ("decide_providerpriceproposal", "Can accept or reject provider prices")
                ],
            },
        ),
        migrations.CreateModel(
            name="Statement",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("month", models.DateField()),
                ("issued_at", models.DateTimeField()),
                ("figures", models.JSONField()),
                ("pdf", models.BinaryField()),
                (
                    "account",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="statements",
                        to="billing.account",
                    ),
                ),
            ],
        ),
        migrations.AddIndex(
            model_name="providerprice",
            index=models.Index(
                fields=["model", "valid_from"], name="billing_pro_model_i_b0a969_idx"
            ),
        ),
        migrations.AddConstraint(
            model_name="providerprice",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("input_per_mtok__gte", 0),
                    ("output_per_mtok__gte", 0),
                    models.Q(
                        ("cached_input_per_mtok__isnull", True),
                        ("cached_input_per_mtok__gte", 0),
                        _connector="OR",
                    ),
                    models.Q(
                        ("cache_write_per_mtok__isnull", True),
                        ("cache_write_per_mtok__gte", 0),
                        _connector="OR",
                    ),
                    models.Q(
                        ("reasoning_per_mtok__isnull", True),
                        ("reasoning_per_mtok__gte", 0),
                        _connector="OR",
                    ),
                ),
                name="provider_price_non_negative",
            ),
        ),
        migrations.AddConstraint(
            model_name="providerprice",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("valid_until__isnull", True),
                    ("valid_until__gt", models.F("valid_from")),
                    _connector="OR",
                ),
                name="provider_price_validity_ordered",
            ),
        ),
        migrations.AddIndex(
            model_name="providerpriceproposal",
            index=models.Index(fields=["status", "model"], name="billing_pro_status_eb3a64_idx"),
        ),
        migrations.AddConstraint(
            model_name="providerpriceproposal",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("input_per_mtok__gte", 0),
                    ("output_per_mtok__gte", 0),
                    models.Q(
                        ("cached_input_per_mtok__isnull", True),
                        ("cached_input_per_mtok__gte", 0),
                        _connector="OR",
                    ),
                    models.Q(
                        ("cache_write_per_mtok__isnull", True),
                        ("cache_write_per_mtok__gte", 0),
                        _connector="OR",
                    ),
                    models.Q(
                        ("reasoning_per_mtok__isnull", True),
                        ("reasoning_per_mtok__gte", 0),
                        _connector="OR",
                    ),
                ),
                name="provider_proposal_non_negative",
            ),
        ),
        migrations.AddConstraint(
            model_name="statement",
            constraint=models.UniqueConstraint(
                fields=("account", "month"), name="one_statement_per_month"
            ),
        ),
        migrations.RunPython(finance_permissions_add, finance_permissions_remove),
        migrations.RunPython(statement_schedule_install, statement_schedule_remove),
    ]
