"""The mock upstream that ships with the project. See gateway/mock/server.py for its rules."""

from gateway.mock.launch import (
    MockUpstreamProcess,
    MockUpstreamThread,
    start_mock_upstream_in_thread,
    start_mock_upstream_process,
)
from gateway.mock.server import (
    COMPLETION_WORDS,
    DEFAULT_COMPLETION_TOKENS,
    completion_text,
    create_app,
)

__all__ = [
    "COMPLETION_WORDS",
    "DEFAULT_COMPLETION_TOKENS",
    "MockUpstreamProcess",
    "MockUpstreamThread",
    "completion_text",
    "create_app",
    "start_mock_upstream_in_thread",
    "start_mock_upstream_process",
]
