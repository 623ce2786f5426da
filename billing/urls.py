"""The account's own endpoints under /v1/ (self-service, payments, statements): thin DRF views."""

from django.urls import URLPattern, URLResolver, include, path

from billing import statement_views, views

urlpatterns: list[URLPattern | URLResolver] = [
    path("v1/keys", views.KeysView.as_view()),
    path("v1/keys/<int:key_id>", views.KeyView.as_view()),
    path("v1/keys/<int:key_id>/revoke", views.KeyRevokeView.as_view()),
    path("v1/billing/requests", views.RequestsView.as_view()),
    path("v1/billing/statements/<str:month>.pdf", statement_views.StatementPdfView.as_view()),
    path("v1/billing/statements/<str:month>", statement_views.StatementView.as_view()),
    # Payments: /v1/billing/checkout, auto-topup, alerts; /webhooks/stripe; the dummy checkout.
    path("", include("billing.payments.urls")),
]
