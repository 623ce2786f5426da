from django.contrib import admin
from django.urls import include, path

from reconciliation.views import healthz, readyz

urlpatterns = [
    path("", include("gateway.urls")),
    path("admin/", admin.site.urls),
    path("", include("django_prometheus.urls")),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
]
