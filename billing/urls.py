"""The account's own endpoints under /v1/ (self-service, payments, statements): thin DRF views."""

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []
