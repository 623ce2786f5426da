from django.urls import path

from gateway import views

# The completion endpoints, /v1/chat/completions and /v1/messages, are not Django views:
# config/asgi.py sends them to the gateway's completion app (gateway/handler.py).
urlpatterns = [
    path("v1/models", views.ModelsView.as_view()),
    path("v1/billing/balance", views.BalanceView.as_view()),
    path("v1/billing/ledger", views.LedgerView.as_view()),
    path("v1/billing/usage", views.UsageView.as_view()),
]
