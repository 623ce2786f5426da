"""API keys' scope (inference or admin) and per-key rate limits (rpm, tpm)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("billing", "0008_account_post_balance_adjustment")]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="scope",
            field=models.CharField(
                choices=[("inference", "Inference"), ("admin", "Admin")],
                default="inference",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="apikey",
            name="rpm",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="apikey",
            name="tpm",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddConstraint(
            model_name="apikey",
            constraint=models.CheckConstraint(
                condition=models.Q(("rpm__isnull", True), ("rpm__gte", 1), _connector="OR"),
                name="apikey_rpm_positive",
            ),
        ),
        migrations.AddConstraint(
            model_name="apikey",
            constraint=models.CheckConstraint(
                condition=models.Q(("tpm__isnull", True), ("tpm__gte", 1), _connector="OR"),
                name="apikey_tpm_positive",
            ),
        ),
    ]
