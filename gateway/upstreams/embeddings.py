"""OpenAI Embeddings: `POST {base}/embeddings`, base URL including /v1.

No output and no stream: the hold is our own count of the input at the input price, and the
cost is the input tokens the provider reports times that price.
"""

from __future__ import annotations

from typing import Any

from billing.pricing import Usage
from gateway.errors import OPENAI, invalid_param
from gateway.tokens import embedding_input_tokens
from gateway.upstreams.base import (
    Adapter,
    ParsedRequest,
    UnreadableUsage,
    UpstreamTarget,
    body_object,
    require_int,
    require_model,
    token_count,
    unreadable_usage_log,
    usage_marked,
    without_nulls,
)
from gateway.upstreams.openai import openai_headers, openai_route_check, openai_url

# OpenAI's limits: at most 2048 inputs per request, and the encoding formats it knows.
MAX_INPUTS = 2048
ENCODING_FORMATS = ("float", "base64")
READ_FIELDS = ("model", "input", "encoding_format", "dimensions")


def _is_token_array(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in value
        )
    )


def require_embedding_input(body: dict[str, Any]) -> None:
    """A non-empty string, or a non-empty array of non-empty strings, of token ids, or of
    token arrays (the four forms OpenAI accepts)."""
    value = body.get("input")
    if isinstance(value, str):
        if not value:
            raise invalid_param("input", "'input' must not be an empty string.")
        return
    if not isinstance(value, list) or not value:
        raise invalid_param("input", "'input' must be a string or a non-empty array.")
    if len(value) > MAX_INPUTS:
        raise invalid_param("input", f"'input' must have at most {MAX_INPUTS} items.")
    if _is_token_array(value):
        return
    for index, item in enumerate(value):
        if not (isinstance(item, str) and item) and not _is_token_array(item):
            raise invalid_param(
                f"input[{index}]",
                "each input must be a non-empty string or a non-empty array of token ids.",
            )


def embeddings_usage(raw: Any) -> Usage | None:
    """Embeddings report prompt_tokens only. None when absent or unreadable."""
    if not isinstance(raw, dict):
        return None
    try:
        prompt = token_count(raw.get("prompt_tokens"))
    except UnreadableUsage as exc:
        unreadable_usage_log(exc)
        return None
    return usage_marked(Usage(input_tokens=prompt), raw, counts=("prompt_tokens",))


def embeddings_usage_json(usage: Usage, cost: str) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "total_tokens": usage.prompt_tokens,
        "cost": cost,
        "estimated": usage.estimated,
    }


class OpenAIEmbeddings(Adapter):
    endpoint = "embeddings"
    style = OPENAI

    @classmethod
    def parse(cls, body: Any) -> ParsedRequest:
        body = without_nulls(body_object(body), READ_FIELDS)
        model = require_model(body)
        require_embedding_input(body)
        encoding = body.get("encoding_format")
        if encoding is not None and encoding not in ENCODING_FORMATS:
            raise invalid_param("encoding_format", "'encoding_format' must be 'float' or 'base64'.")
        require_int(body, "dimensions", minimum=1, maximum=65536)
        return ParsedRequest(
            body=body,
            model=model,
            messages=[],
            stream=False,
            include_usage=False,
            max_output_tokens=0,  # nothing is generated: the hold covers the input alone
            max_tokens_param="",
        )

    @classmethod
    def prompt_tokens(cls, parsed: ParsedRequest) -> int:
        return embedding_input_tokens(parsed.body["input"])

    @classmethod
    def route_check(cls, *, model: str, upstream_kind: str) -> None:
        openai_route_check(model=model, upstream_kind=upstream_kind, path="/v1/embeddings")

    @classmethod
    def upstream_request(
        cls,
        parsed: ParsedRequest,
        target: UpstreamTarget,
        *,
        max_output_tokens: int,
        anthropic_version: str | None,
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        body = {**parsed.body, "model": target.upstream_model}
        return openai_url(target, "embeddings"), openai_headers(target), body

    @classmethod
    def usage_from_body(cls, body: dict[str, Any]) -> Usage | None:
        return embeddings_usage(body.get("usage"))

    @classmethod
    def texts_from_body(cls, body: dict[str, Any]) -> list[str]:
        return []  # nothing generated to count

    @classmethod
    def with_cost(cls, body: dict[str, Any], *, usage: Usage, cost: str) -> dict[str, Any]:
        return {**body, "usage": embeddings_usage_json(usage, cost)}
