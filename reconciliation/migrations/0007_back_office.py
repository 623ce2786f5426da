"""The Finance group's permissions for the back office: onboarding in the admin (opening
accounts, issuing keys and editing their budgets, managing upstreams and routes)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

# Frozen here on purpose: a migration must not change meaning when app code changes later.
BACK_OFFICE_PERMISSIONS = (
    ("billing", "add_account"),
    ("billing", "add_apikey"),
    ("billing", "change_apikey"),
    ("gateway", "view_upstream"),
    ("gateway", "add_upstream"),
    ("gateway", "change_upstream"),
    ("gateway", "view_route"),
    ("gateway", "add_route"),
    ("gateway", "change_route"),
)


def _permissions(apps):
    Permission = apps.get_model("auth", "Permission")
    for app_label, codename in BACK_OFFICE_PERMISSIONS:
        permission = Permission.objects.filter(
            content_type__app_label=app_label, codename=codename
        ).first()
        if permission is not None:
            yield permission


def back_office_permissions_add(apps, schema_editor):
    # Permissions are normally created after all migrations (post_migrate); make them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    group, _ = apps.get_model("auth", "Group").objects.get_or_create(name="Finance")
    group.permissions.add(*_permissions(apps))


def back_office_permissions_remove(apps, schema_editor):
    group = apps.get_model("auth", "Group").objects.filter(name="Finance").first()
    if group is not None:
        group.permissions.remove(*_permissions(apps))


class Migration(migrations.Migration):
    dependencies = [
        ("reconciliation", "0006_payments"),
        ("billing", "0012_back_office"),
        ("gateway", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.RunPython(back_office_permissions_add, back_office_permissions_remove)
    ]
