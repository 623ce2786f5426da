"""The completion endpoints' request and response bodies, and the error shapes, as DRF
serializers: they validate each request (through its endpoint's adapter) and document every
body in the OpenAPI schema (drf-spectacular reads their fields).

A request body is validated by the adapter's `parse` (gateway/upstreams/): it is the one place
each endpoint's rules live, it names the invalid parameter the way the provider does
(`messages[0].content`, `max_tokens`), and it keeps every field it does not check, to forward
as it came. The declared fields say what a client may send; they never change what is sent on.
"""

from __future__ import annotations

from typing import Any, ClassVar

from drf_spectacular.utils import OpenApiExample, extend_schema_field
from rest_framework import serializers
from rest_framework.fields import empty

from gateway.upstreams.base import ABSURD_MAX_TOKENS, MODEL_MAX_LENGTH, Adapter, ParsedRequest
from gateway.upstreams.embeddings import ENCODING_FORMATS, MAX_INPUTS
from gateway.upstreams.responses import MIN_OUTPUT_TOKENS


class CompletionRequestSerializer(serializers.Serializer):
    """A completion request body, validated by its endpoint's adapter (context["adapter"]):
    `validated_data` is the adapter's ParsedRequest, and invalid input raises its 400."""

    # Request bodies the schema shows (and schemathesis sends): the demo's models (seed_demo).
    examples: ClassVar[list[OpenApiExample]] = []

    def run_validation(self, data: Any = empty) -> ParsedRequest:
        adapter: type[Adapter] = self.context["adapter"]
        return adapter.parse(None if data is empty else data)


class _Message(serializers.Serializer):
    role = serializers.CharField(help_text="system, user, assistant, tool, ...")
    content = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text="A string, or an array of content parts.",
    )


def _model() -> serializers.CharField:
    return serializers.CharField(
        max_length=MODEL_MAX_LENGTH,
        help_text="A model alias this gateway routes (GET /v1/models lists the key's).",
    )


def _max_tokens(help_text: str, *, required: bool = False) -> serializers.IntegerField:
    return serializers.IntegerField(
        min_value=1, max_value=ABSURD_MAX_TOKENS, required=required, help_text=help_text
    )


class ChatCompletionRequestSerializer(CompletionRequestSerializer):
    """OpenAI's chat completion request. Other fields (temperature, tools, ...) are forwarded
    to the upstream as sent."""

    model = _model()
    messages = _Message(many=True, min_length=1)  # type: ignore[call-arg]
    stream = serializers.BooleanField(
        required=False,
        allow_null=True,
        help_text="true: the answer is a text/event-stream of chat.completion.chunk events.",
    )
    stream_options = serializers.DictField(
        required=False,
        allow_null=True,
        help_text='{"include_usage": true} adds the usage chunk (with its cost) at the end.',
    )
    max_completion_tokens = _max_tokens("The output limit; the hold covers it.")
    max_tokens = _max_tokens("The output limit's older name; the smaller of the two applies.")
    n = serializers.IntegerField(min_value=1, max_value=128, required=False, allow_null=True)

    examples = [
        OpenApiExample(
            "A completion",
            value={"model": "gpt-demo", "messages": [{"role": "user", "content": "Hello"}]},
            request_only=True,
        ),
        OpenApiExample(
            "A stream with its usage chunk",
            value={
                "model": "gpt-demo",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_completion_tokens": 64,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            request_only=True,
        ),
    ]


class AnthropicMessagesRequestSerializer(CompletionRequestSerializer):
    """Anthropic's Messages request. Other fields are forwarded to the upstream as sent."""

    model = _model()
    messages = _Message(many=True, min_length=1)  # type: ignore[call-arg]
    max_tokens = _max_tokens("The output limit; the hold covers it.", required=True)
    system = serializers.JSONField(
        required=False, allow_null=True, help_text="A string, or an array of text blocks."
    )
    stream = serializers.BooleanField(
        required=False,
        allow_null=True,
        help_text="true: the answer is a text/event-stream of Anthropic's message events.",
    )

    examples = [
        OpenApiExample(
            "A message",
            value={
                "model": "claude-demo",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "Hello"}],
            },
            request_only=True,
        ),
        OpenApiExample(
            "A stream",
            value={
                "model": "claude-demo",
                "max_tokens": 64,
                "system": "Be brief.",
                "messages": [{"role": "user", "content": "Hello"}],
                "stream": True,
            },
            request_only=True,
        ),
    ]


_TOKEN_ARRAY = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "description": "A message (role, content) or a "
                    "typed item (function_call_output, ...).",
                },
            },
        ]
    }
)
class _ResponsesInput(serializers.JSONField):
    """The Responses API's `input` (the adapter checks it)."""


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_INPUTS,
                "items": {"type": "string", "minLength": 1},
            },
            _TOKEN_ARRAY,
            {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": _TOKEN_ARRAY},
        ]
    }
)
class _EmbeddingsInput(serializers.JSONField):
    """An embeddings `input` (the adapter checks it)."""


class ResponsesRequestSerializer(CompletionRequestSerializer):
    """OpenAI's Responses API request. Other fields (tools, reasoning, text, ...) are forwarded
    to the upstream as sent. Nothing is stored: `store` may only be false, and
    `previous_response_id`, `conversation` and `background` are refused (400 naming them)."""

    model = _model()
    input = _ResponsesInput(
        help_text="A string (one user message), or an array of input items: messages "
        "(role and content), tool calls and their outputs."
    )
    instructions = serializers.CharField(
        required=False, allow_null=True, help_text="A system message, before the input."
    )
    max_output_tokens = serializers.IntegerField(
        min_value=MIN_OUTPUT_TOKENS,
        max_value=ABSURD_MAX_TOKENS,
        required=False,
        allow_null=True,
        help_text="The output limit; the hold covers it (the route's maximum when absent).",
    )
    stream = serializers.BooleanField(
        required=False,
        allow_null=True,
        help_text="true: the answer is a text/event-stream of the typed response.* events; "
        "response.completed carries the usage with its cost.",
    )
    store = serializers.BooleanField(
        required=False,
        allow_null=True,
        help_text="Only false (or absent): this gateway stores no responses, and asks the "
        "upstream to store none.",
    )

    examples = [
        OpenApiExample(
            "A response",
            value={"model": "gpt-demo", "input": "Hello", "instructions": "Be brief."},
            request_only=True,
        ),
        OpenApiExample(
            "A stream of input items",
            value={
                "model": "gpt-demo",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                "max_output_tokens": 64,
                "stream": True,
            },
            request_only=True,
        ),
    ]


class EmbeddingsRequestSerializer(CompletionRequestSerializer):
    """OpenAI's embeddings request, billed on input tokens only, at the input price."""

    model = _model()
    input = _EmbeddingsInput(
        help_text="A string, or an array (at most 2048) of strings, of token ids, or of "
        "token arrays."
    )
    encoding_format = serializers.ChoiceField(
        choices=list(ENCODING_FORMATS), required=False, allow_null=True
    )
    dimensions = serializers.IntegerField(min_value=1, required=False, allow_null=True)

    examples = [
        OpenApiExample(
            "Two texts", value={"model": "gpt-demo", "input": ["Hello", "World"]}, request_only=True
        ),
    ]


class _Cost(serializers.Serializer):
    cost = serializers.CharField(
        required=False, help_text="What this request was charged, a decimal string in USD."
    )


class _ChatChoice(serializers.Serializer):
    index = serializers.IntegerField(required=False)
    message = serializers.DictField(required=False)
    finish_reason = serializers.CharField(required=False, allow_null=True)


class _ChatUsage(_Cost):
    prompt_tokens = serializers.IntegerField(required=False)
    completion_tokens = serializers.IntegerField(required=False)
    total_tokens = serializers.IntegerField(required=False)


class ChatCompletionSerializer(serializers.Serializer):
    """OpenAI's chat.completion, as the upstream sent it, with the cost in `usage`."""

    id = serializers.CharField(required=False)
    object = serializers.CharField(required=False)
    model = serializers.CharField(required=False)
    choices = _ChatChoice(many=True, required=False)
    usage = _ChatUsage(required=False)


class _MessagesUsage(_Cost):
    input_tokens = serializers.IntegerField(required=False)
    output_tokens = serializers.IntegerField(required=False)


class AnthropicMessageSerializer(serializers.Serializer):
    """Anthropic's message, as the upstream sent it, with the cost in `usage`."""

    id = serializers.CharField(required=False)
    type = serializers.CharField(required=False)
    role = serializers.CharField(required=False)
    model = serializers.CharField(required=False)
    content = serializers.ListField(child=serializers.DictField(), required=False)
    stop_reason = serializers.CharField(required=False, allow_null=True)
    usage = _MessagesUsage(required=False)


class ServerSentEventSerializer(serializers.Serializer):
    """One event of a streamed answer (text/event-stream): the provider's own events, relayed
    as they come, with the cost in the last usage the stream reports."""

    event = serializers.CharField(
        required=False,
        help_text="The event's type (Anthropic's message_start, ..., the Responses API's "
        "response.created, ...); Chat Completions sends none.",
    )
    data = serializers.CharField(  # type: ignore[assignment]  # the field, not Serializer.data
        help_text="A JSON object (a chat.completion.chunk, an Anthropic or a Responses API "
        'event), or "[DONE]".'
    )


class _OpenAIErrorDetail(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField(help_text="invalid_request_error, insufficient_quota, ...")
    param = serializers.CharField(
        allow_null=True, help_text="The invalid parameter, as `messages[0].content`."
    )
    code = serializers.CharField(allow_null=True, help_text="invalid_value, invalid_api_key, ...")


class OpenAIErrorSerializer(serializers.Serializer):
    """Every error of the OpenAI-style endpoints (all of /v1/ but /v1/messages)."""

    error = _OpenAIErrorDetail()


class _AnthropicErrorDetail(serializers.Serializer):
    type = serializers.CharField(help_text="invalid_request_error, authentication_error, ...")
    message = serializers.CharField()


class AnthropicErrorSerializer(serializers.Serializer):
    """Every error of /v1/messages."""

    type = serializers.ChoiceField(choices=["error"])
    error = _AnthropicErrorDetail()


# --- The read endpoints' answers ---------------------------------------------------------


class _Model(serializers.Serializer):
    id = serializers.CharField(help_text="The alias to send as `model`.")
    object = serializers.CharField()
    created = serializers.IntegerField()
    owned_by = serializers.CharField()


class ModelListSerializer(serializers.Serializer):
    object = serializers.CharField()
    data = _Model(many=True)  # type: ignore[assignment]  # the field, not Serializer.data


def _money(help_text: str) -> serializers.CharField:
    return serializers.CharField(help_text=f"{help_text}: a decimal string, in USD.")


class BalanceSerializer(serializers.Serializer):
    account_id = serializers.IntegerField()
    name = serializers.CharField()
    currency = serializers.CharField()
    status = serializers.CharField()
    balance = _money("Posted balance")
    held = _money("Held by requests in progress")
    available = _money("balance - held: what new requests can hold")
    overdraft = _money("How far below zero the account may go")


class LedgerEntrySerializer(serializers.Serializer):
    entry_id = serializers.IntegerField()
    transaction_id = serializers.IntegerField()
    kind = serializers.CharField()
    amount = _money("Signed: positive credits the account")
    request_id = serializers.CharField(allow_null=True)
    model = serializers.CharField(allow_null=True)
    memo = serializers.CharField(allow_blank=True)
    occurred_at = serializers.DateTimeField()
    posted_at = serializers.DateTimeField()
    is_overrun = serializers.BooleanField()
    is_late = serializers.BooleanField()
    reverses = serializers.IntegerField(allow_null=True)


class LedgerPageSerializer(serializers.Serializer):
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = LedgerEntrySerializer(many=True)


class _UsageRow(serializers.Serializer):
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField(allow_null=True)
    cached_input_tokens = serializers.IntegerField(allow_null=True)
    cache_write_tokens = serializers.IntegerField(allow_null=True)
    output_tokens = serializers.IntegerField(allow_null=True)
    reasoning_tokens = serializers.IntegerField(allow_null=True)
    cost = _money("Charged")


class _UsageDay(_UsageRow):
    day = serializers.DateField()


class _UsageModel(_UsageRow):
    model = serializers.CharField()


class UsageSerializer(serializers.Serializer):
    account_id = serializers.IntegerField()
    start = serializers.DateField()
    end = serializers.DateField()
    by_day = _UsageDay(many=True)
    by_model = _UsageModel(many=True)


class _ResponsesUsage(_Cost):
    input_tokens = serializers.IntegerField(required=False)
    output_tokens = serializers.IntegerField(required=False)
    total_tokens = serializers.IntegerField(required=False)
    input_tokens_details = serializers.DictField(
        required=False, help_text="cached_tokens: cache reads, inside input_tokens."
    )
    output_tokens_details = serializers.DictField(
        required=False, help_text="reasoning_tokens: hidden reasoning, inside output_tokens."
    )


class ResponseSerializer(serializers.Serializer):
    """OpenAI's response object, as the upstream sent it, with the cost in `usage`."""

    id = serializers.CharField(required=False)
    object = serializers.CharField(required=False)
    status = serializers.CharField(required=False, help_text="completed, incomplete, ...")
    model = serializers.CharField(required=False)
    output = serializers.ListField(child=serializers.DictField(), required=False)
    usage = _ResponsesUsage(required=False)


class _EmbeddingsUsage(_Cost):
    prompt_tokens = serializers.IntegerField(required=False)
    total_tokens = serializers.IntegerField(required=False)


class EmbeddingListSerializer(serializers.Serializer):
    """OpenAI's list of embeddings, as the upstream sent it, with the cost in `usage`."""

    object = serializers.CharField(required=False)
    data = serializers.ListField(  # type: ignore[assignment]  # the field, not Serializer.data
        child=serializers.DictField(), required=False
    )
    model = serializers.CharField(required=False)
    usage = _EmbeddingsUsage(required=False)
