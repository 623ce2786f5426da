from django.urls import path

from gateway import views

# The completion endpoints: config/asgi.py sends these paths to the gateway's completion
# handler (gateway/handler.py), everything else under /v1/ to its general one.
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/messages"})

urlpatterns = [
    path("v1/chat/completions", views.ChatCompletionsView.as_view()),
    path("v1/messages", views.MessagesView.as_view()),
    path("v1/models", views.ModelsView.as_view()),
    path("v1/billing/balance", views.BalanceView.as_view()),
    path("v1/billing/ledger", views.LedgerView.as_view()),
    path("v1/billing/usage", views.UsageView.as_view()),
]
