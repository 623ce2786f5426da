from django.contrib import admin
from django.urls import include, path

from config.metrics import metrics_view
from reconciliation.views import healthz, readyz

urlpatterns = [
    path("", include("gateway.urls")),
    path("", include("billing.urls")),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="prometheus-django-metrics"),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
]
