from django.urls import path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from gateway import serializers, views
from gateway.upstreams.anthropic import AnthropicMessages
from gateway.upstreams.openai import OpenAIChat

# A completion endpoint is its adapter and one line here (gateway/views.py's CompletionView).
urlpatterns = [
    path(
        "v1/chat/completions",
        views.CompletionView.as_view(
            adapter=OpenAIChat,
            serializer_class=serializers.ChatCompletionRequestSerializer,
            response_serializer=serializers.ChatCompletionSerializer,
        ),
    ),
    path(
        "v1/messages",
        views.CompletionView.as_view(
            adapter=AnthropicMessages,
            serializer_class=serializers.AnthropicMessagesRequestSerializer,
            response_serializer=serializers.AnthropicMessageSerializer,
        ),
    ),
    path("v1/models", views.ModelsView.as_view()),
    path("v1/billing/balance", views.BalanceView.as_view()),
    path("v1/billing/ledger", views.LedgerView.as_view()),
    path("v1/billing/usage", views.UsageView.as_view()),
    # The schema and its page need no key.
    path("v1/openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    path("v1/docs", SpectacularSwaggerView.as_view(url_name="openapi-schema"), name="api-docs"),
]
