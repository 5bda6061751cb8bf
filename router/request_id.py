"""X-Request-Id: taken from the client when it is safe to echo and log, otherwise generated.

The id lives in a ContextVar for the duration of one request: aiohttp runs each request in its
own task, which copies the context, so every log line written while serving it (handlers,
validation, errors) can carry the id without threading it through every call. The batcher is a
separate long-lived task and logs batches, not requests, so its lines have no id.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar

HEADER = "X-Request-Id"
MAX_LENGTH = 128
# NOTE: module-level by necessity (a ContextVar must be shared to be read); its value is
# per-task, so it is not shared state between requests.
CURRENT: ContextVar[str | None] = ContextVar("request_id", default=None)


def is_valid(value: str) -> bool:
    """Printable ASCII without spaces, 1..128 characters: safe in a header and a log line."""
    return 0 < len(value) <= MAX_LENGTH and all("!" <= char <= "~" for char in value)


def resolve(header: str | None) -> str:
    """The client's id if valid, else a fresh one (an invalid id is replaced, not rejected: a
    tracing header must never be the reason a generation fails)."""
    if header is not None and is_valid(header):
        return header
    return str(uuid.uuid4())
