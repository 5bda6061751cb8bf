"""How a grammar is compiled and what compiled grammars are keyed by: one definition for the shards
(shard/grammar.py, which run the grammars) and the router (router/grammar/, which compiles each
grammar in a worker process before queueing its request so that a grammar the shards would refuse
is a 400/422 and never a failed step). Torch-free; xgrammar is imported by the caller.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable

from pytgi_proto import generate_pb2 as pb

# xgrammar's compile_json_schema options. any_whitespace=False: JSON comes out as json.dumps
# writes it ({"a": 1, "b": [1, 2]}), so a small model cannot loop on whitespace.
JSON_SCHEMA_OPTIONS = {"any_whitespace": False, "strict_mode": True}
GRAMMAR_TYPES = {pb.GRAMMAR_TYPE_JSON: "json", pb.GRAMMAR_TYPE_REGEX: "regex",
                 pb.GRAMMAR_TYPE_STRUCTURAL_TAG: "structural_tag"}

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: ".
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """A grammar that cannot run. `param` names the request field it came from, where one does
    (OpenAI's error `param`); the TGI routes answer 422 "grammar is not valid: <message>", the
    shards INVALID_ARGUMENT."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def clean_error(error: BaseException) -> str:
    """xgrammar's message without the "[hh:mm:ss] /path/file.cc:123: " of its C++ errors."""
    text = str(error).strip() or type(error).__name__
    return _CPP_PREFIX.sub("", text).strip()


def compile_grammar(compiler, grammar_type: int, text: str):
    """Compile `text` as `grammar_type` with xgrammar's `compiler`; GrammarError if it cannot."""
    if grammar_type not in GRAMMAR_TYPES:
        raise GrammarError(f"unknown grammar type {grammar_type}")
    if not text:  # xgrammar compiles an empty regex; an empty grammar is a client's mistake
        raise GrammarError("the grammar is empty")
    try:
        if grammar_type == pb.GRAMMAR_TYPE_JSON:
            json.loads(text)  # a clear message for text that is not JSON at all
            return compiler.compile_json_schema(text, **JSON_SCHEMA_OPTIONS)
        if grammar_type == pb.GRAMMAR_TYPE_REGEX:
            return compiler.compile_regex(text)
        return compiler.compile_structural_tag(text)
    except json.JSONDecodeError as error:
        raise GrammarError(f"the JSON schema is not valid JSON: {error}") from error
    except Exception as error:  # xgrammar raises RuntimeError / pydantic / its own errors
        raise GrammarError(clean_error(error)) from error


def tokenizer_info(tokenizer, vocab_size: int | None, stop_ids: Iterable[int]):
    """xgrammar's view of a Hugging Face tokenizer: ids past the tokenizer's own up to `vocab_size`
    (the model's logits width) are never allowed; `stop_ids` end a grammar."""
    import xgrammar as xgr

    stops = sorted(set(stop_ids))
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None)


def grammar_key(grammar_type: int, text: str) -> tuple[int, bytes]:
    """What compiled grammars are cached and pinned by, on the router and on the shards."""
    return grammar_type, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
