"""The Finance group: the permissions that gate every money action in the admin."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

# Frozen here on purpose: a migration must not change meaning when app code changes later.
FINANCE_PERMISSIONS = (
    ("billing", "post_adjustment"),
    ("reconciliation", "reconcile_item"),
    ("billing", "view_account"),
    ("billing", "view_apikey"),
    ("billing", "view_languagemodel"),
    ("billing", "view_tariff"),
    ("billing", "view_ledgertransaction"),
    ("billing", "view_ledgerleg"),
    ("billing", "view_hold"),
    ("billing", "view_usagerecord"),
    ("reconciliation", "view_reconciliationitem"),
    ("reconciliation", "view_staffaction"),
)


def finance_group_create(apps, schema_editor):
    # Permissions are normally created after all migrations (post_migrate); make them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name="Finance")
    for app_label, codename in FINANCE_PERMISSIONS:
        permission = Permission.objects.filter(
            content_type__app_label=app_label, codename=codename
        ).first()
        if permission is not None:
            group.permissions.add(permission)


def finance_group_delete(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name="Finance").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("reconciliation", "0001_initial"),
        ("billing", "0002_ledger_triggers"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(finance_group_create, finance_group_delete)]
