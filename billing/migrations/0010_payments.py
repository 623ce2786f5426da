"""Payments: providers' customers, checkouts, stored webhook events, auto top-up, balance alerts and their outbox."""

import billing.money
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0009_api_key_scope_and_rate_limits"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="account",
            name="auto_topup_amount",
            field=billing.money.MoneyField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="account",
            name="auto_topup_armed",
            field=models.BooleanField(default=True),
        ),
        migrations.AddField(
            model_name="account",
            name="auto_topup_enabled",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="account",
            name="auto_topup_monthly_limit",
            field=billing.money.MoneyField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="account",
            name="auto_topup_threshold",
            field=billing.money.MoneyField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="account",
            name="billing_email",
            field=models.EmailField(blank=True, default="", max_length=254),
        ),
        migrations.AddField(
            model_name="account",
            name="depleted_armed",
            field=models.BooleanField(default=True),
        ),
        migrations.AddField(
            model_name="account",
            name="low_balance_armed",
            field=models.BooleanField(default=True),
        ),
        migrations.AddField(
            model_name="account",
            name="low_balance_threshold",
            field=billing.money.MoneyField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="account",
            name="payment_customer_id",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.AddField(
            model_name="account",
            name="payment_method_id",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.AddField(
            model_name="account",
            name="webhook_secret",
            field=models.CharField(blank=True, default="", max_length=100),
        ),
        migrations.AddField(
            model_name="account",
            name="webhook_url",
            field=models.URLField(blank=True, default="", max_length=500),
        ),
        migrations.CreateModel(
            name="Notification",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("type", models.CharField(max_length=64)),
                ("payload", models.JSONField()),
                ("created_at", models.DateTimeField()),
                ("dispatched_at", models.DateTimeField(blank=True, null=True)),
                (
                    "account",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="notifications",
                        to="billing.account",
                    ),
                ),
            ],
        ),
        migrations.CreateModel(
            name="NotificationDelivery",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "channel",
                    models.CharField(
                        choices=[("webhook", "Webhook"), ("email", "Email")], max_length=16
                    ),
                ),
                ("target", models.CharField(max_length=500)),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("pending", "Pending"),
                            ("delivered", "Delivered"),
                            ("failed", "Failed"),
                        ],
                        default="pending",
                        max_length=16,
                    ),
                ),
                ("attempts", models.PositiveIntegerField(default=0)),
                ("next_attempt_at", models.DateTimeField()),
                ("delivered_at", models.DateTimeField(blank=True, null=True)),
                ("last_error", models.TextField(blank=True, default="")),
                (
                    "notification",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="deliveries",
                        to="billing.notification",
                    ),
                ),
            ],
            options={
                "verbose_name_plural": "notification deliveries",
            },
        ),
        migrations.CreateModel(
            name="DeliveryAttempt",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("attempted_at", models.DateTimeField()),
                ("ok", models.BooleanField()),
                ("status_code", models.PositiveIntegerField(blank=True, null=True)),
                ("error", models.TextField(blank=True, default="")),
                (
                    "delivery",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="attempt_log",
                        to="billing.notificationdelivery",
                    ),
                ),
            ],
        ),
        migrations.CreateModel(
            name="PaymentEvent",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("provider", models.CharField(max_length=16)),
                ("event_id", models.CharField(max_length=255)),
                ("type", models.CharField(max_length=100)),
                ("payload", models.JSONField()),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("received", "Received"),
                            ("applied", "Applied"),
                            ("ignored", "Ignored"),
                            ("failed", "Failed"),
                        ],
                        default="received",
                        max_length=16,
                    ),
                ),
                ("detail", models.TextField(blank=True, default="")),
                ("payment_intent_id", models.CharField(blank=True, default="", max_length=255)),
                ("transaction_ids", models.JSONField(blank=True, default=list)),
                ("received_at", models.DateTimeField()),
                ("applied_at", models.DateTimeField(blank=True, null=True)),
                (
                    "account",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="billing.account",
                    ),
                ),
            ],
        ),
        migrations.CreateModel(
            name="AutoTopupAttempt",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("amount", billing.money.MoneyField()),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("pending", "Pending"),
                            ("charging", "Charging"),
                            ("confirmed", "Confirmed"),
                            ("succeeded", "Succeeded"),
                            ("failed", "Failed"),
                            ("skipped", "Skipped"),
                        ],
                        default="pending",
                        max_length=16,
                    ),
                ),
                ("payment_intent_id", models.CharField(blank=True, default="", max_length=255)),
                ("failure_reason", models.TextField(blank=True, default="")),
                ("created_at", models.DateTimeField()),
                ("updated_at", models.DateTimeField()),
                (
                    "account",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="auto_topups",
                        to="billing.account",
                    ),
                ),
                (
                    "transaction",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="billing.ledgertransaction",
                    ),
                ),
            ],
            options={
                "indexes": [
                    models.Index(
                        fields=["account", "created_at"], name="billing_aut_account_1bade6_idx"
                    ),
                    models.Index(
                        condition=models.Q(("status", "pending")),
                        fields=["created_at"],
                        name="auto_topup_pending",
                    ),
                ],
            },
        ),
        migrations.CreateModel(
            name="Checkout",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("provider", models.CharField(max_length=16)),
                ("session_id", models.CharField(max_length=255)),
                ("amount", billing.money.MoneyField()),
                ("url", models.URLField(max_length=2000)),
                (
                    "status",
                    models.CharField(
                        choices=[("open", "Open"), ("completed", "Completed")],
                        default="open",
                        max_length=16,
                    ),
                ),
                ("payment_intent_id", models.CharField(blank=True, default="", max_length=255)),
                ("created_at", models.DateTimeField()),
                ("completed_at", models.DateTimeField(blank=True, null=True)),
                (
                    "account",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="checkouts",
                        to="billing.account",
                    ),
                ),
                (
                    "created_by",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                (
                    "transaction",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="billing.ledgertransaction",
                    ),
                ),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("provider", "session_id"), name="checkout_unique"
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("amount__gt", 0)), name="checkout_amount_positive"
                    ),
                ],
            },
        ),
        migrations.AddIndex(
            model_name="notification",
            index=models.Index(
                fields=["account", "created_at"], name="billing_not_account_d1a6da_idx"
            ),
        ),
        migrations.AddIndex(
            model_name="notification",
            index=models.Index(
                condition=models.Q(("dispatched_at__isnull", True)),
                fields=["created_at"],
                name="notification_undispatched",
            ),
        ),
        migrations.AddIndex(
            model_name="notificationdelivery",
            index=models.Index(
                condition=models.Q(("status", "pending")),
                fields=["next_attempt_at"],
                name="delivery_pending",
            ),
        ),
        migrations.AddConstraint(
            model_name="notificationdelivery",
            constraint=models.UniqueConstraint(
                fields=("notification", "channel"), name="one_delivery_per_channel"
            ),
        ),
        migrations.AddIndex(
            model_name="paymentevent",
            index=models.Index(fields=["received_at"], name="billing_pay_receive_b5630f_idx"),
        ),
        migrations.AddIndex(
            model_name="paymentevent",
            index=models.Index(
                condition=models.Q(("status", "failed")),
                fields=["payment_intent_id"],
                name="payment_event_waiting",
            ),
        ),
        migrations.AddConstraint(
            model_name="paymentevent",
            constraint=models.UniqueConstraint(
                fields=("provider", "event_id"), name="payment_event_unique"
            ),
        ),
        migrations.AlterModelOptions(
            name="autotopupattempt",
            options={"permissions": [("set_auto_topup", "Can set an account's auto top-up")]},
        ),
        migrations.AlterModelOptions(
            name="notification",
            options={"permissions": [("set_alerts", "Can set an account's balance alerts")]},
        ),
    ]
