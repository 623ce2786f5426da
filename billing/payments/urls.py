from django.urls import path

from billing.payments import views

urlpatterns = [
    path("v1/billing/checkout", views.CheckoutView.as_view()),
    path("v1/billing/auto-topup", views.AutoTopupView.as_view()),
    path("v1/billing/alerts", views.AlertsView.as_view()),
    path("webhooks/stripe", views.StripeWebhookView.as_view()),
    path(
        "payments/dummy/checkout/<str:session_id>",
        views.dummy_checkout_page,
        name="payments-dummy-checkout",
    ),
]
