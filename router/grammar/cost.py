"""A grammar's compile cost, estimated before anything compiles it.

What grows a grammar without bound is repetition: `{n,m}` in a regex, `maxLength`, `maxItems`,
`maxProperties`, ... in a JSON schema. One bound per repeat is not enough: repeats in sequence
add up (`a{50000}b{50000}...`) and nested ones multiply (`(a{1000}){1000}`, an array of
`maxItems` strings of `maxLength`). So the estimate is the size of the grammar with every
repeat written out:
- an atom (a literal character, a character class, `.`, a JSON scalar, an enum value, a property
  name) counts 1;
- a sequence, the branches of an alternative, the properties of an object and the schemas of
  `anyOf`/`oneOf`/`allOf` add up;
- a repeat multiplies its body by its upper bound (its lower bound when it has none; an
  unbounded loop `*`/`+` counts its body once, since it compiles to one cycle);
- a `$ref` counts what it points to, where it is used (a recursive one counts 1, like a loop);
- regexes anywhere in a schema count too: `pattern`, the keys of `patternProperties`, and
  `propertyNames`, whose keys repeat with the object's `maxProperties`.
The caller compares the estimate with one limit (router.grammar.validator.MAX_GRAMMAR_COST).

Regexes are parsed with Python's own parser (`re._parser`) where it accepts them. xgrammar's
dialect is close to ECMAScript, and what Python refuses (`\\p{L}`, `(?<name>...)`, repeat counts
past Python's maximum) is measured by a bracket/brace scan that may count too much but never
too little.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from re import _constants as _sre  # Python's own regex parser (private, stable since 3.11)
from re import _parser as _sre_parse

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT}
_SCAN_REPEAT = re.compile(r"\{(\d*)(?:(,)(\d*))?\}")
# A repeat count with more digits than this is "huge" (and int() refuses > 4300 digits anyway).
_MAX_DIGITS = 18


@dataclass(frozen=True, slots=True)
class Estimate:
    cost: int
    where: str | None  # JSON pointer of the smallest part that exceeds the limit, if any


def regex_cost(pattern: str) -> int:
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return _scan_cost(pattern)
    return _parsed_cost(parsed)


def _parsed_cost(items) -> int:
    total = 0
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            total += max(low if high == _sre.MAXREPEAT else high, 1) * _parsed_cost(body)
        elif op is _sre.SUBPATTERN:
            total += _parsed_cost(av[-1])
        elif op is _sre.BRANCH:
            total += sum(_parsed_cost(branch) for branch in av[1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            total += _parsed_cost(av[1])
        elif op is _sre.GROUPREF_EXISTS:
            total += sum(_parsed_cost(branch) for branch in av[1:] if branch is not None)
        elif op is _sre.ATOMIC_GROUP:
            total += _parsed_cost(av)
        elif op is not _sre.AT:  # anchors match no character
            total += 1
    return total


def _repeat_count(text: str) -> int:
    return 10**_MAX_DIGITS if len(text) > _MAX_DIGITS else int(text)


def _scan_cost(pattern: str) -> int:
    """The conservative scan: groups, alternatives, classes and `{n,m}` by bracket matching.
    Iterative, so nesting depth costs no recursion."""
    stack: list[tuple[int, int]] = []  # (branches so far, sequence so far) of enclosing groups
    branches = seq = last = 0  # `last`: the cost of the atom a quantifier would repeat
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            if pattern[i - 1:i] in ("p", "P", "u", "x") and pattern[i:i + 1] == "{":  # \p{L}, \u{...}
                close = pattern.find("}", i)
                i = n if close < 0 else close + 1
            seq, last = seq + 1, 1
            continue
        if c == "[":
            j = i + 1
            if pattern[j:j + 1] == "^":
                j += 1
            if pattern[j:j + 1] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            seq, last = seq + 1, 1
            continue
        if c == "(":
            stack.append((branches, seq))
            branches = seq = last = 0
        elif c == ")" and stack:
            group = branches + seq
            branches, seq = stack.pop()
            seq, last = seq + group, group
        elif c == "|":
            branches, seq, last = branches + seq, 0, 0
        elif c == "{" and (m := _SCAN_REPEAT.match(pattern, i)) and (m.group(1) or m.group(3)):
            low, _, high = m.groups()  # {n}, {n,} (counted n times) or {n,m}
            count = max(_repeat_count(high or low), 1)
            seq += last * (count - 1)
            last *= count
            i = m.end()
            continue
        elif c not in "*+?":
            seq, last = seq + 1, 1
        i += 1
    while stack:  # unbalanced: xgrammar refuses it, but count it all the same
        group = branches + seq
        branches, seq = stack.pop()
        seq += group
    return branches + seq


def _bound(value: Any) -> int:
    """A schema's count keyword as an int (0 when absent or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if isinstance(value, float):
        if not math.isfinite(value):
            return 10**_MAX_DIGITS if value == math.inf else 0
        value = int(value)
    return max(value, 0)


def _count(schema: dict, *keys: str) -> int:
    """How often the repeated part of `schema` is written out: its largest bound, at least 1."""
    return max(1, *(_bound(schema.get(key)) for key in keys))


_STRING_KEYS = ("maxLength", "minLength", "pattern", "format")
_ARRAY_KEYS = ("items", "prefixItems", "maxItems", "minItems", "contains")
_OBJECT_KEYS = ("properties", "patternProperties", "additionalProperties", "propertyNames",
                "maxProperties", "minProperties")


class _SchemaCost:
    """One schema document: `$ref`s resolve inside `root`, each pointer is measured once."""

    def __init__(self, root: Any, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.refs: dict[str, int] = {}
        self.resolving: set[str] = set()
        self.where: str | None = None

    def cost(self, schema: Any, path: str) -> int:
        if not isinstance(schema, dict):
            return 1
        total = 0
        ref = schema.get("$ref")
        if isinstance(ref, str):
            total += self._ref(ref)
        for key in ("anyOf", "oneOf", "allOf"):
            branches = schema.get(key)
            if isinstance(branches, list):
                total += sum(self.cost(s, f"{path}/{key}/{i}") for i, s in enumerate(branches))
        for key in ("not", "if", "then", "else"):
            if isinstance(schema.get(key), dict):
                total += self.cost(schema[key], f"{path}/{key}")
        if isinstance(schema.get("enum"), list):
            total += max(len(schema["enum"]), 1)
        types = schema.get("type")
        types = {types} if isinstance(types, str) else {t for t in types if isinstance(t, str)} \
            if isinstance(types, list) else set()
        if "string" in types or any(key in schema for key in _STRING_KEYS):
            total += self._string(schema, path)
        if "array" in types or any(key in schema for key in _ARRAY_KEYS):
            total += self._array(schema, path)
        if "object" in types or any(key in schema for key in _OBJECT_KEYS):
            total += self._object(schema, path)
        total = max(total, 1)
        if total > self.limit and self.where is None:
            self.where = path or "#"  # children are measured first: this is the deepest culprit
        return total

    def _string(self, schema: dict, path: str) -> int:
        pattern = schema.get("pattern")
        pattern_cost = regex_cost(pattern) if isinstance(pattern, str) else 0
        if pattern_cost > self.limit and self.where is None:
            self.where = f"{path}/pattern"
        return max(_count(schema, "maxLength", "minLength"), pattern_cost)

    def _array(self, schema: dict, path: str) -> int:
        total = 0
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            total += sum(self.cost(s, f"{path}/prefixItems/{i}") for i, s in enumerate(prefix))
        items = schema.get("items")
        if isinstance(items, list):  # draft-07 tuples
            total += sum(self.cost(s, f"{path}/items/{i}") for i, s in enumerate(items))
        elif isinstance(items, dict):
            total += _count(schema, "maxItems", "minItems") * self.cost(items, f"{path}/items")
        else:
            total += _count(schema, "maxItems", "minItems")
        if isinstance(schema.get("contains"), dict):
            total += _count(schema, "maxContains", "minContains") * self.cost(schema["contains"], f"{path}/contains")
        return total

    def _object(self, schema: dict, path: str) -> int:
        total = 0
        properties = schema.get("properties")
        if isinstance(properties, dict):
            total += sum(1 + self.cost(s, f"{path}/properties/{_escape(k)}") for k, s in properties.items())
        # The open part (pattern / additional / named-by-propertyNames keys) repeats up to
        # maxProperties times; each key is a regex, then a value.
        open_part = 0
        patterns = schema.get("patternProperties")
        if isinstance(patterns, dict):
            for key, value in patterns.items():
                where = f"{path}/patternProperties/{_escape(key)}"
                key_cost = regex_cost(key)
                if key_cost > self.limit and self.where is None:
                    self.where = where
                open_part += key_cost + self.cost(value, where)
        for key in ("additionalProperties", "unevaluatedProperties", "propertyNames"):
            if isinstance(schema.get(key), dict):
                open_part += self.cost(schema[key], f"{path}/{key}")
        return total + _count(schema, "maxProperties", "minProperties") * open_part

    def _ref(self, ref: str) -> int:
        if ref in self.refs:
            return self.refs[ref]
        if ref in self.resolving or not ref.startswith("#"):
            return 1  # recursion compiles to a loop; remote refs do not compile at all
        target = _resolve(self.root, ref)
        self.resolving.add(ref)
        try:
            cost = self.cost(target, ref) if target is not None else 1
        finally:
            self.resolving.discard(ref)
        self.refs[ref] = cost
        return cost


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def schema_estimate(schema: Any, limit: int) -> Estimate:
    walker = _SchemaCost(schema, limit)
    cost = walker.cost(schema, "#")
    return Estimate(cost, walker.where)


def structural_tag_estimate(tag: Any, limit: int) -> Estimate:
    """Every JSON schema and regex a structural tag holds, added up (tags compile them all)."""
    total, where = 0, None
    stack: list[tuple[Any, str]] = [(tag, "#")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            if isinstance(value.get("json_schema"), dict):
                estimate = schema_estimate(value["json_schema"], limit)
                total += estimate.cost
                if estimate.where is not None and where is None:
                    where = f"{path}/json_schema{estimate.where[1:]}"
                continue
            if value.get("type") == "regex" and isinstance(value.get("pattern"), str):
                cost = regex_cost(value["pattern"])
                total += cost
                if cost > limit and where is None:
                    where = f"{path}/pattern"
                continue
            stack.extend((item, f"{path}/{_escape(str(k))}") for k, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, f"{path}/{i}") for i, item in enumerate(value))
    return Estimate(max(total, 1), where)
