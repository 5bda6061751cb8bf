"""Reading one field of an OpenAI request body, with OpenAI's error shapes: every rule answers 400
`invalid_request_error` with `param` naming the field, worded as OpenAI words it ("Invalid type for
'x': …", "Invalid value for 'x': …", "Missing required parameter: 'x'."). `null` means "absent" for
every optional field (clients such as `text-generation` send every field, null when unset).
"""

from __future__ import annotations

from typing import Any

from router import bounds
from router.errors import InvalidRequestError


def _kind(value: Any) -> str:
    for kind, name in ((type(None), "null"), (bool, "a boolean"), ((int, float), "a number"),
                       (str, "a string"), (list, "an array")):
        if isinstance(value, kind):
            return name
    return "an object"


def type_error(param: str, expected: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} "
                               "instead.", param, code="invalid_type")


def value_error(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param, code="invalid_value")


def missing(param: str) -> InvalidRequestError:
    return InvalidRequestError(f"Missing required parameter: '{param}'.", param,
                               code="missing_required_parameter")


def is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def read_bool(body: dict, name: str, default: bool | None = None, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise type_error(param or name, "a boolean", value)
    return value


def read_int(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(name, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        expected = f"between {low} and {high}" if high is not None else f">= {low}"
        raise value_error(name, f"expected an integer {expected}, but got {value} instead.")
    return value


def read_number(body: dict, name: str, low: float, high: float, *, open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_error(name, "a number", value)
    number = bounds.finite_float(value)  # None: NaN, ±inf, or beyond what a proto float holds
    if number is None or number > high or (number <= low if open_low else number < low):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise value_error(name, f"expected a number in {interval}, but got {value!r} instead.")
    return number


def read_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise type_error(name, "a string", value)
    return value


def read_object(body: dict, name: str) -> dict | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise type_error(name, "an object", value)
    return value


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", None, code="invalid_type")
    return body
