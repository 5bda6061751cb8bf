"""TGI's native `grammar` parameter → (grammar type, text) for the shards; router/validation.py
applies it to `/generate`, and router/openai/chat_fields.py to the same shapes in an OpenAI
`response_format` or `grammar`. Before a request is queued the grammar is checked (cost, compile)
by router/grammar/validator.py.

`json`/`json_object`: a schema object or its JSON text; `json_schema`: `{name?, schema}`; `regex`: a
string → (GRAMMAR_TYPE_JSON | GRAMMAR_TYPE_REGEX, text). Unlike TGI, a JSON schema need not have
`properties`: any schema xgrammar compiles is accepted.
"""

from __future__ import annotations

import json
from typing import Any

from pytgi_common.grammar import GrammarError
from pytgi_proto import generate_pb2 as pb
from router import bounds

JSON = pb.GRAMMAR_TYPE_JSON
REGEX = pb.GRAMMAR_TYPE_REGEX
STRUCTURAL_TAG = pb.GRAMMAR_TYPE_STRUCTURAL_TAG


def native_grammar(kind: str, value: Any, param: str = "grammar") -> tuple[int, str]:
    """TGI's `{"type", "value"}` (kind already read "json_object" as "json") → (type, text)."""
    if kind == "regex":
        if not isinstance(value, str):
            raise GrammarError("a regex grammar's value must be a string", param)
        return REGEX, value
    if kind == "json":
        if isinstance(value, str):
            try:
                value = bounds.loads(value)
            except bounds.JsonTooComplex as error:
                raise GrammarError(f"the JSON schema is too complex: {error}", param) from None
            except json.JSONDecodeError as error:
                raise GrammarError(f"the JSON schema is not valid JSON: {error}", param) from error
        return JSON, schema_text(value, param)
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise GrammarError("a json_schema grammar's value must be an object with a `schema`", param)
        return JSON, schema_text(value["schema"], param)
    raise GrammarError(f"unknown grammar type `{kind}`", param)


def schema_text(schema: Any, param: str | None = None) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be a JSON object", param)
    # Key order is kept: it is the order in which properties are generated.
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
