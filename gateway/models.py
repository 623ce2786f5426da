"""Where requests go: upstream providers and the routes from model aliases to them."""

from __future__ import annotations

from django.db import models

from billing.models import LanguageModel


class Upstream(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai"  # base URL includes /v1, like https://api.openai.com/v1
        ANTHROPIC = "anthropic"  # base URL without /v1, like https://api.anthropic.com

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    base_url = models.URLField(max_length=500)
    # The credential is read from this environment variable at call time; never stored.
    api_key_env = models.CharField(max_length=100, blank=True, default="")
    connect_timeout_seconds = models.PositiveIntegerField(default=10)
    # Longest silence tolerated between two chunks of a response.
    read_timeout_seconds = models.PositiveIntegerField(default=120)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"


class Route(models.Model):
    model = models.OneToOneField(LanguageModel, on_delete=models.CASCADE, related_name="route")
    upstream = models.ForeignKey(Upstream, on_delete=models.PROTECT, related_name="routes")
    upstream_model = models.CharField(max_length=200)
    # Used when the client sends no max_tokens, and the largest it may ask for.
    max_output_tokens = models.PositiveIntegerField(default=4096)

    def __str__(self) -> str:
        return f"{self.model.alias} -> {self.upstream.name}:{self.upstream_model}"
