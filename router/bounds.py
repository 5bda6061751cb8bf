"""Hard bounds on what one request may carry, and the one JSON reader that enforces them.

Every value a client sends is bounded before the request is queued, so that no request can make
the router, a shard step or another request pay for its size. The bounds that are not a flag live
here (the flags: --payload-limit, --max-stop-sequences, --max-client-batch-size,
--max-input-tokens / --max-total-tokens, --max-top-n-tokens); README "Operations" lists them all.

- MAX_JSON_DEPTH: nesting of any JSON the router parses (the body, tool-call `arguments`, schema
  text). Deeper JSON is refused before anything walks it: a template, a schema compiler or
  `json.dumps` would recurse once per level. 64 is far beyond any real schema or message (OpenAI
  allows 10 levels in a structured-output schema).
- MAX_TOOLS: tools per chat request (OpenAI's own limit).
- MAX_LOGIT_BIAS: `logit_bias` entries (OpenAI's own limit); each one is work in every step.
- MAX_STOP_CHARS: characters of one stop sequence; every generated token is matched against all
  of them.
- MAX_LOGGED_USER: characters of OpenAI's `user` kept for the access line (the rest is cut, so a
  client cannot fill the log).
Messages are bounded by the model: each one takes at least one prompt token, so a chat with more
messages than --max-input-tokens can never fit and is refused before it is rendered.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_JSON_DEPTH = 64
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300
MAX_STOP_CHARS = 512
MAX_LOGGED_USER = 128

# Widths of the proto fields request parameters travel in (proto/generate.proto).
U32_MAX = 2**32 - 1
I32_MAX = 2**31 - 1
U64_MAX = 2**64 - 1
F32_MAX = 3.4028234663852886e38


class JsonTooComplex(ValueError):
    """Valid JSON the server will not take: nested deeper than MAX_JSON_DEPTH, or an integer
    literal too long to convert (Python's int/str conversion limit)."""


def loads(data: str | bytes | bytearray) -> Any:
    """`json.loads`, bounded: JsonTooComplex (a ValueError) instead of a RecursionError or a
    value nested deeper than MAX_JSON_DEPTH; json.JSONDecodeError / UnicodeDecodeError as usual."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise JsonTooComplex(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as error:
        if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
            raise
        # Python refuses int literals of more than 4300 digits (CVE-2020-10735): a bound, not a bug.
        raise JsonTooComplex(f"a number in the JSON is too long ({error})") from None
    check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """JsonTooComplex if `value` nests lists / dicts more than `limit` levels. Iterative, and it
    only visits containers, so its cost is bounded by the value's size, never its depth."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise JsonTooComplex(f"the JSON is nested more than {limit} levels deep")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def finite_float(value: int | float) -> float | None:
    """`value` as a float when it is finite and fits a proto float (f32); None otherwise (NaN,
    ±inf, or a huge integer that float() cannot even represent)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    if not math.isfinite(number) or abs(number) > F32_MAX:
        return None
    return number
