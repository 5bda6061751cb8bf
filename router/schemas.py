"""Typed TGI request bodies, parsed from JSON the way TGI's serde structs deserialize them.

Parsing mirrors serde: unknown fields are ignored, a missing optional field takes its default,
and a value of the wrong type is rejected with serde's wording, prefixed by the field path and by
axum's "Failed to deserialize the JSON body into the target type: " (TGI answers these 422). Two
details of serde's messages are not reproduced: the trailing " at line L column C" (the body has
already been parsed here, positions are gone), and serde's acceptance of a JSON array in place
of a struct (we reject it as the wrong type).

`parameters` absent vs present (TGI quirk, kept on purpose): when the body has no `parameters`
key, TGI builds them with `default_parameters()`, whose `do_sample` is **true**; when
`parameters` is present, a missing `do_sample` is serde's `false`. So `{"inputs": "x"}` samples
(temperature 1) while `{"inputs": "x", "parameters": {}}` is greedy. We follow TGI because
clients written against TGI (curl examples, the hub widget) get TGI's behaviour; any request that
wants determinism already sends `parameters`. `"parameters": null` is a type error, as in serde.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from router import bounds
from router.errors import ValidationError

_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "

GRAMMAR_TYPES = ("json", "json_object", "regex", "json_schema")


@dataclass(slots=True)
class Grammar:
    type: str  # "json" | "regex" | "json_schema" ("json_object" is read as "json")
    value: Any


@dataclass(slots=True)
class GenerateParameters:
    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: list[str] = field(default_factory=list)
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Grammar | None = None
    adapter_id: str | None = None
    # Not in TGI's GenerateParameters (OpenAI knobs the shards support natively).
    presence_penalty: float | None = None
    min_p: float | None = None


def default_parameters() -> GenerateParameters:
    """TGI's `default_parameters()`: used only when the body has no `parameters` key."""
    return GenerateParameters(do_sample=True)


@dataclass(slots=True)
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters = field(default_factory=default_parameters)
    stream: bool = False
    # Not read from JSON (serde `skip` in TGI): false when the text is an already templated chat
    # prompt whose special tokens are in the text.
    add_special_tokens: bool = True
    # Not read from JSON either: a prompt given as token ids (OpenAI completions); `inputs` then
    # holds their decoded text.
    input_ids: tuple[int, ...] | None = None


# ------------------------------------------------------------------------------------ parsing


class _TypeMismatch(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)


def _unexpected(value: Any) -> str:
    """serde's `Unexpected` display of a JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value!r}`"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def _invalid_type(path: str, value: Any, expected: str) -> _TypeMismatch:
    return _TypeMismatch(path, f"invalid type: {_unexpected(value)}, expected {expected}")


INT_RANGES = {  # the proto's widths (router/bounds.py), as serde names them
    "u32": (0, bounds.U32_MAX),
    "u64": (0, bounds.U64_MAX),
    "usize": (0, bounds.U64_MAX),
    "i32": (-bounds.I32_MAX - 1, bounds.I32_MAX),
}


def _int(path: str, value: Any, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(path, value, kind)
    low, high = INT_RANGES[kind]
    if not low <= value <= high:
        raise _TypeMismatch(path, f"invalid value: integer `{value}`, expected {kind}")
    return value


def _float(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid_type(path, value, "f32")
    number = bounds.finite_float(value)
    if number is None:
        # Python's json accepts NaN/Infinity and reads 1e999 as inf; serde_json rejects them, and a
        # value past f32's range would travel to the shards as inf.
        raise _TypeMismatch(path, f"invalid value: {_unexpected(value)}, expected f32")
    return number


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid_type(path, value, "a boolean")
    return value


def _str(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid_type(path, value, "a string")
    return value


def _optional(parse, path: str, value: Any, *args):
    return None if value is None else parse(path, value, *args)


def _stop(path: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _invalid_type(path, value, "a sequence")
    return [_str(f"{path}[{i}]", item) for i, item in enumerate(value)]


def _grammar(path: str, value: Any) -> Grammar:
    if not isinstance(value, dict):
        raise _invalid_type(path, value, "adjacently tagged enum GrammarType")
    if "type" not in value:
        raise _TypeMismatch(path, "missing field `type`")
    kind = value["type"]
    if not isinstance(kind, str):
        raise _invalid_type(f"{path}.type", kind, "variant identifier")
    if kind not in GRAMMAR_TYPES:
        expected = ", ".join(f"`{name}`" for name in GRAMMAR_TYPES)
        raise _TypeMismatch(f"{path}.type", f"unknown variant `{kind}`, expected one of {expected}")
    if "value" not in value:
        raise _TypeMismatch(path, "missing field `value`")
    content = value["value"]
    if kind == "regex":
        content = _str(f"{path}.value", content)
    elif kind == "json_schema" and not isinstance(content, dict):
        raise _invalid_type(f"{path}.value", content, "struct JsonSchemaConfig")
    return Grammar("json" if kind == "json_object" else kind, content)


def _parse_optional_int(kind: str):
    return lambda path, value: _optional(_int, path, value, kind)


def _parse_optional(parse):
    return lambda path, value: _optional(parse, path, value)


# Field parsers of GenerateParameters. serde reads a JSON object in document order and stops at
# the first bad field; fields absent from the object keep their defaults.
_PARAMETER_FIELDS = {
    "best_of": _parse_optional_int("usize"),
    "temperature": _parse_optional(_float),
    "repetition_penalty": _parse_optional(_float),
    "frequency_penalty": _parse_optional(_float),
    "top_k": _parse_optional_int("i32"),
    "top_p": _parse_optional(_float),
    "typical_p": _parse_optional(_float),
    "do_sample": _bool,
    "max_new_tokens": _parse_optional_int("u32"),
    "return_full_text": _parse_optional(_bool),
    "stop": _stop,
    "truncate": _parse_optional_int("usize"),
    "watermark": _bool,
    "details": _bool,
    "decoder_input_details": _bool,
    "seed": _parse_optional_int("u64"),
    "top_n_tokens": _parse_optional_int("u32"),
    "grammar": _parse_optional(_grammar),
    "adapter_id": _parse_optional(_str),
    "presence_penalty": _parse_optional(_float),
    "min_p": _parse_optional(_float),
}


def _parameters(path: str, value: Any) -> GenerateParameters:
    if not isinstance(value, dict):
        raise _invalid_type(path, value, "struct GenerateParameters")
    params = GenerateParameters()
    for name, item in value.items():
        parse = _PARAMETER_FIELDS.get(name)
        if parse is not None:  # unknown fields are ignored, as serde does by default
            setattr(params, name, parse(f"{path}.{name}", item))
    return params


def parse_generate_request(body: Any, *, compat: bool) -> GenerateRequest:
    """A `GenerateRequest` (`/generate`, `/generate_stream`, `/tokenize`) or, with `compat`, a
    `CompatGenerateRequest` (`POST /`, which also reads `stream`). Raises a 422 ValidationError
    with serde's message, unprefixed, on a body of the wrong shape."""
    struct = "CompatGenerateRequest" if compat else "GenerateRequest"
    inputs: str | None = None
    parameters: GenerateParameters | None = None
    stream = False
    try:
        if not isinstance(body, dict):
            raise _invalid_type("", body, f"struct {struct}")
        for name, value in body.items():
            if name == "inputs":
                inputs = _str("inputs", value)
            elif name == "parameters":
                parameters = _parameters("parameters", value)
            elif name == "stream" and compat:
                stream = _bool("stream", value)
        if inputs is None:
            raise _TypeMismatch("", "missing field `inputs`")
    except _TypeMismatch as error:
        raise ValidationError(_DESERIALIZE + str(error), prefix=False) from None
    if parameters is None:
        parameters = default_parameters()
    return GenerateRequest(inputs=inputs, parameters=parameters, stream=stream)
