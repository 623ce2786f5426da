from django.urls import path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from gateway import serializers, views
from gateway.upstreams.anthropic import AnthropicMessages
from gateway.upstreams.embeddings import OpenAIEmbeddings
from gateway.upstreams.openai import OpenAIChat
from gateway.upstreams.responses import OpenAIResponses

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
    path(
        "v1/responses",
        views.CompletionView.as_view(
            adapter=OpenAIResponses,
            serializer_class=serializers.ResponsesRequestSerializer,
            response_serializer=serializers.ResponseSerializer,
        ),
    ),
    # Nothing is stored, so nothing can be retrieved: each is the 400 naming response_id.
    path(
        "v1/responses/<str:response_id>",
        views.StoredResponseView.as_view(http_method_names=["get", "delete"]),
    ),
    path(
        "v1/responses/<str:response_id>/cancel",
        views.StoredResponseView.as_view(http_method_names=["post"]),
    ),
    path(
        "v1/responses/<str:response_id>/input_items",
        views.StoredResponseView.as_view(http_method_names=["get"]),
    ),
    path(
        "v1/embeddings",
        views.CompletionView.as_view(
            adapter=OpenAIEmbeddings,
            serializer_class=serializers.EmbeddingsRequestSerializer,
            response_serializer=serializers.EmbeddingListSerializer,
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
