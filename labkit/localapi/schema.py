"""JSON Schemas the local API constrains output to: what it accepts, and a valid example.

Forced tool calls (Anthropic ``tool_choice`` ``any``/``tool``, OpenAI ``required`` or a
named function) and structured replies (OpenAI ``response_format``, Anthropic
``output_config.format``) promise output that matches a JSON Schema. The llama engine
keeps that promise with a llama.cpp grammar built from the schema; the sim engine
answers with a valid example (:func:`example`). Both accept the same schemas, checked
here by :func:`check_schema` before any engine sees them.

Notes on deliberate choices:

1. **Never accept and ignore.** llama-cpp-python's schema-to-grammar converter
   silently drops what it does not know (``minimum``, ``uniqueItems``, ``not``, a
   ``type`` list's other keywords...), which would let the model break the schema.
   Every keyword that constrains a value is either supported (:data:`SUPPORTED`) or
   refused with a 400 that names it and where it is. Annotations (``title``,
   ``description``, ``default``, ``examples``...) and keywords JSON Schema itself does
   not define are ignored, as a validator ignores them.
2. **Normalised, then converted.** :func:`check_schema` returns a copy the converter
   handles faithfully: a ``type`` list becomes an ``anyOf`` of one schema per type
   (the converter would otherwise drop every other keyword), ``true`` sub-schemas
   become ``{}``, a one-element ``allOf`` is merged into its parent, a ``required``
   name without a property gets an any-value property, and an array without
   ``items`` gets ``items: {}`` (so ``minItems`` is kept).
3. **Patterns are matched whole.** The grammar generates a string from the pattern,
   so ``pattern: "abc"`` (which JSON Schema reads as "contains abc") is generated as
   exactly ``abc``: tighter than asked, never looser. ``\\d``, ``\\w`` and ``\\s`` are
   rewritten as character classes, which llama.cpp's grammar syntax knows.
4. **Formats** the grammar knows are ``date``, ``time``, ``date-time`` and ``uuid``;
   ``email``, ``hostname``, ``ipv4`` and ``uri`` are generated from a conservative
   pattern (every string it allows is valid). Other formats are refused.
5. **Bounded**: at most :data:`MAX_NODES` sub-schemas and :data:`MAX_DEPTH` levels.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from .engine import EngineError

__all__ = [
    "FORMAT_PATTERNS",
    "MAX_DEPTH",
    "MAX_NODES",
    "SUPPORTED",
    "check_schema",
    "example",
]

#: Most sub-schemas in one schema (note 5).
MAX_NODES = 2000
#: Deepest nesting of sub-schemas (note 5).
MAX_DEPTH = 32

#: The value-constraining keywords the local API honours (note 1).
SUPPORTED = (
    "type",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "minLength",
    "maxLength",
)

#: JSON Schema keywords that constrain values and that the grammar cannot honour.
_UNSUPPORTED = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedItems",
    "minProperties",
    "maxProperties",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedProperties",
    "not",
    "if",
    "then",
    "else",
    "$dynamicRef",
    "$recursiveRef",
    "contentSchema",
)

_GRAMMAR_FORMATS = ("date", "time", "date-time", "uuid")

#: Formats generated from a pattern (note 4): every string these allow is valid.
FORMAT_PATTERNS = {
    "email": r"^[a-z0-9]+([._-][a-z0-9]+)*@[a-z0-9]+(-[a-z0-9]+)*([.][a-z0-9]+(-[a-z0-9]+)*)*[.][a-z]{2,6}$",
    "hostname": r"^[a-z0-9]+(-[a-z0-9]+)*([.][a-z0-9]+(-[a-z0-9]+)*)*$",
    "ipv4": r"^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])([.](25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$",
    "uri": r"^https?://[a-z0-9]+(-[a-z0-9]+)*([.][a-z0-9]+(-[a-z0-9]+)*)*(/[a-zA-Z0-9._~-]*)*$",
}

_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
_STRING_KEYS = ("pattern", "format", "minLength", "maxLength")
_ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems")
_OBJECT_KEYS = ("properties", "required", "additionalProperties")
_BY_TYPE = {"string": _STRING_KEYS, "array": _ARRAY_KEYS, "object": _OBJECT_KEYS}


def _refuse(where: str, message: str) -> EngineError:
    return EngineError(
        "invalid_request_error",
        f"{where}: {message} The local API constrains output to a schema with "
        f"{', '.join(SUPPORTED)} (and annotations such as description); it refuses "
        "what it cannot enforce rather than ignore it.",
    )


class _Checker:
    def __init__(self, root_where: str) -> None:
        self.root_where = root_where
        self.nodes = 0

    def visit(self, schema: Any, where: str, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _refuse(self.root_where, f"the schema has more than {MAX_NODES} sub-schemas.")
        if depth > MAX_DEPTH:
            raise _refuse(where, f"the schema nests deeper than {MAX_DEPTH} levels.")
        if schema is True:
            return {}
        if schema is False:
            raise _refuse(where, "a `false` schema (nothing is valid) cannot be generated.")
        if not isinstance(schema, dict):
            raise _refuse(where, "a schema must be an object.")
        s = dict(schema)
        for key in _UNSUPPORTED:
            if key in s and not (key == "uniqueItems" and s[key] is False):
                raise _refuse(f"{where}.{key}", f"`{key}` cannot be constrained.")
        sub = depth + 1
        # one-element allOf: merge it into its parent (note 2)
        if isinstance(s.get("allOf"), list) and len(s["allOf"]) == 1:
            part = s.pop("allOf")[0]
            part = {} if part is True else part
            if isinstance(part, dict):
                clash = [k for k in part if k in s and k in SUPPORTED]
                if clash:
                    raise _refuse(
                        f"{where}.allOf", f"`allOf` repeats {', '.join(clash)} of its parent."
                    )
                s = {**s, **part}
        for key in ("$defs", "definitions"):
            if isinstance(s.get(key), dict):
                s[key] = {
                    name: self.visit(d, f"{where}.{key}.{name}", sub) for name, d in s[key].items()
                }
        constraining = [k for k in s if k in SUPPORTED]
        if "$ref" in s:
            ref = s["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise _refuse(f"{where}.$ref", "only local references (#/...) are supported.")
            others = [k for k in constraining if k != "$ref"]
            if others:
                raise _refuse(where, f"`$ref` beside {', '.join(others)} cannot be constrained.")
            return s
        types = s.get("type")
        if isinstance(types, list):
            if not types or not all(t in _TYPES for t in types):
                raise _refuse(f"{where}.type", f"unknown type in {types!r}.")
            if len(types) == 1:
                s["type"] = types[0]
            else:  # a type list becomes anyOf (note 2)
                if "anyOf" in s or "oneOf" in s:
                    raise _refuse(
                        where, "a `type` list beside `anyOf`/`oneOf` cannot be constrained."
                    )
                alts = []
                for t in types:
                    keep = _BY_TYPE.get(t, ())
                    alt = {k: v for k, v in s.items() if k not in SUPPORTED or k in keep}
                    alt["type"] = t
                    alts.append(alt)
                rest = {k: v for k, v in s.items() if k not in SUPPORTED or k in ("enum", "const")}
                rest["anyOf"] = alts
                s = rest
                types = None
        constraining = [k for k in s if k in SUPPORTED]
        if types is not None and types not in _TYPES:
            raise _refuse(f"{where}.type", f"unknown type {types!r}.")
        for key in ("anyOf", "oneOf"):
            if key in s:
                alts = s[key]
                if not isinstance(alts, list) or not alts:
                    raise _refuse(f"{where}.{key}", "must be a non-empty list of schemas.")
                others = [k for k in constraining if k not in (key, "enum", "const")]
                if others:
                    raise _refuse(
                        where, f"`{key}` beside {', '.join(others)} cannot be constrained."
                    )
                s[key] = [self.visit(a, f"{where}.{key}[{i}]", sub) for i, a in enumerate(alts)]
        if "enum" in s or "const" in s:
            if "enum" in s and (not isinstance(s["enum"], list) or not s["enum"]):
                raise _refuse(f"{where}.enum", "must be a non-empty list.")
            return s  # exact values: nothing else can loosen them
        if "allOf" in s:
            parts = s["allOf"]
            if not isinstance(parts, list):
                raise _refuse(f"{where}.allOf", "must be a list of schemas.")
            checked = []
            for i, part in enumerate(parts):
                part = self.visit(part, f"{where}.allOf[{i}]", sub)
                if not ("properties" in part or "$ref" in part) or any(
                    k in part
                    for k in SUPPORTED
                    if k not in ("type", "properties", "required", "$ref")
                ):
                    raise _refuse(
                        f"{where}.allOf[{i}]",
                        "`allOf` is supported for object schemas with properties only.",
                    )
                checked.append(part)
            s["allOf"] = checked
        kind = s.get("type")
        if kind is None:
            if "properties" in s or "additionalProperties" in s:
                kind = "object"
            elif "items" in s or "prefixItems" in s:
                kind = "array"
            else:
                stray = [k for k in constraining if k in _STRING_KEYS + _ARRAY_KEYS + _OBJECT_KEYS]
                if stray:
                    raise _refuse(where, f"give a `type` for {', '.join(stray)}.")
        if kind == "object":
            s = self._object(s, where, sub)
        elif kind == "array":
            s = self._array(s, where, sub)
        elif kind == "string":
            s = self._string(s, where)
        for key in _STRING_KEYS + _ARRAY_KEYS + _OBJECT_KEYS:
            if key in s and key not in _BY_TYPE.get(kind or "", ()):
                raise _refuse(f"{where}.{key}", f"`{key}` does not apply to type {kind!r}.")
        return s

    def _object(self, s: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise _refuse(f"{where}.properties", "must be an object.")
        props = {k: self.visit(v, f"{where}.properties.{k}", depth) for k, v in props.items()}
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _refuse(f"{where}.required", "must be a list of property names.")
        for name in required:
            props.setdefault(name, {})  # note 2
        extra = s.get("additionalProperties")
        if extra is not None and extra is not False:
            extra = self.visit(extra, f"{where}.additionalProperties", depth)
        s = {**s, "properties": props}
        if extra is not None:
            s["additionalProperties"] = extra
        return s

    def _array(self, s: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        for key, value in (("minItems", lo), ("maxItems", hi)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise _refuse(f"{where}.{key}", "must be a non-negative integer.")
        if hi is not None and hi < lo:
            raise _refuse(where, "maxItems is below minItems.")
        items, prefix = s.get("items"), s.get("prefixItems")
        if isinstance(items, list):  # draft-4 tuple form
            prefix, items = items, False
        if prefix is not None:
            if not isinstance(prefix, list) or not prefix:
                raise _refuse(f"{where}.prefixItems", "must be a non-empty list of schemas.")
            if items not in (None, False):
                raise _refuse(where, "`prefixItems` with an `items` schema cannot be constrained.")
            n = len(prefix)
            if lo > n or (hi is not None and hi < n):
                raise _refuse(
                    where, "minItems/maxItems beside `prefixItems` cannot be constrained."
                )
            out = {k: v for k, v in s.items() if k not in ("items", "minItems", "maxItems")}
            out["prefixItems"] = [
                self.visit(p, f"{where}.prefixItems[{i}]", depth) for i, p in enumerate(prefix)
            ]
            return out
        if items is False:
            if lo:
                raise _refuse(where, "`items: false` with minItems > 0 has no valid value.")
            return {**s, "items": {"enum": ["__never__"]}, "maxItems": 0}
        return {**s, "items": self.visit({} if items is None else items, f"{where}.items", depth)}

    def _string(self, s: dict[str, Any], where: str) -> dict[str, Any]:
        given = [k for k in ("pattern", "format") if k in s]
        lengths = [k for k in ("minLength", "maxLength") if k in s]
        if len(given) + (1 if lengths else 0) > 1:
            raise _refuse(where, f"{' and '.join(given + lengths)} together cannot be constrained.")
        for key in lengths:
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _refuse(f"{where}.{key}", "must be a non-negative integer.")
        if "format" in s:
            fmt = s["format"]
            if fmt in FORMAT_PATTERNS:
                s = {k: v for k, v in s.items() if k != "format"}
                s["pattern"] = FORMAT_PATTERNS[fmt]
            elif fmt not in _GRAMMAR_FORMATS:
                known = ", ".join((*_GRAMMAR_FORMATS, *FORMAT_PATTERNS))
                raise _refuse(
                    f"{where}.format", f"format {fmt!r} cannot be constrained (known: {known})."
                )
        if "pattern" in s:
            s = {**s, "pattern": _anchored(s["pattern"], f"{where}.pattern")}
        return s


_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r"}


def _anchored(pattern: Any, where: str) -> str:
    """The pattern matched whole, with ``\\d \\w \\s`` as classes (note 3)."""
    if not isinstance(pattern, str):
        raise _refuse(where, "must be a string.")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _refuse(where, f"not a valid regular expression ({exc}).") from None
    if "(?" in pattern:
        raise _refuse(where, "lookarounds and (?...) groups cannot be constrained.")
    body = pattern
    if body.startswith("^"):
        body = body[1:]
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    out, i, in_class = [], 0, False
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in _CLASS_ESCAPES:
                out.append(_CLASS_ESCAPES[nxt] if in_class else f"[{_CLASS_ESCAPES[nxt]}]")
            elif nxt in "DWSbB" or nxt.isdigit():
                raise _refuse(where, f"the escape \\{nxt} cannot be constrained.")
            elif in_class:
                out.append(c + nxt)
            elif nxt in ".-/^$\\\"'@:#%&=,;<>!~`":
                out.append(f"[{nxt}]" if nxt not in "\\^" else c + nxt)
            else:
                out.append(c + nxt)
            i += 2
            continue
        if c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        out.append(c)
        i += 1
    return "^(" + "".join(out) + ")$"


def check_schema(schema: Any, where: str) -> dict[str, Any]:
    """A normalised copy of ``schema`` (note 2), or EngineError 400 naming what cannot be
    constrained and where (``where`` is the request field, e.g. ``tools.0.input_schema``)."""
    return _Checker(where).visit(copy.deepcopy(schema), where, 0)


# ── a valid example, for the sim engine ───────────────────────────────────────


def example(schema: dict[str, Any], *, name: str = "value") -> Any:
    """A small value valid against a schema returned by :func:`check_schema`.

    Deterministic. Strings say where they are (``"sim city"``); required properties are
    filled, and the first optional one when nothing is required.
    """
    return _Example(schema).make(schema, name, 0)


class _Example:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self.root
        for part in ref.lstrip("#").split("/")[1:]:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def make(self, s: dict[str, Any], name: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            return None
        if "$ref" in s:
            return self.make(self.resolve(s["$ref"]), name, depth + 1)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return s["enum"][0]
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self.make(s[key][0], name, depth + 1)
        if "allOf" in s:
            out: dict[str, Any] = {}
            for part in s["allOf"]:
                out.update(self.make(part, name, depth + 1))
            return out
        kind = s.get("type")
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else "string"
        if kind == "object":
            props = s.get("properties", {})
            keys = list(s.get("required", [])) or list(props)[:1]
            return {k: self.make(props.get(k, {}), k, depth + 1) for k in keys}
        if kind == "array":
            if "prefixItems" in s:
                return [self.make(p, name, depth + 1) for p in s["prefixItems"]]
            n = max(s.get("minItems", 0), 1 if s.get("maxItems", 1) else 0)
            return [self.make(s.get("items", {}), name, depth + 1) for _ in range(n)]
        if kind == "integer":
            return 1
        if kind == "number":
            return 1.5
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return _example_string(s, name)


_FORMAT_EXAMPLES = {
    "date": "2024-11-01",
    "time": "12:00:00Z",
    "date-time": "2024-11-01T12:00:00Z",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
}


def _example_string(s: dict[str, Any], name: str) -> str:
    if "format" in s:
        return _FORMAT_EXAMPLES[s["format"]]
    if "pattern" in s:
        return _shortest_match(s["pattern"])
    text = f"sim {name}"
    lo, hi = s.get("minLength", 0), s.get("maxLength")
    if len(text) < lo:
        text += "x" * (lo - len(text))
    if hi is not None:
        text = text[:hi]
    return text


def _shortest_match(pattern: str) -> str:
    """A short string matching ``pattern`` whole (built from Python's regex parse tree)."""
    from re import _parser  # type: ignore[attr-defined]
    from re._constants import (  # type: ignore[import-not-found]
        ANY,
        AT,
        BRANCH,
        CATEGORY,
        IN,
        LITERAL,
        MAX_REPEAT,
        MIN_REPEAT,
        NEGATE,
        NOT_LITERAL,
        RANGE,
        SUBPATTERN,
    )

    categories = {"CATEGORY_DIGIT": "0", "CATEGORY_WORD": "a", "CATEGORY_SPACE": " "}

    def member(c: str, items: Any) -> bool:
        for op, av in items:
            if op is LITERAL and chr(av) == c:
                return True
            if op is RANGE and av[0] <= ord(c) <= av[1]:
                return True
            if op is CATEGORY and re.fullmatch(
                {"CATEGORY_DIGIT": r"\d", "CATEGORY_WORD": r"\w", "CATEGORY_SPACE": r"\s"}.get(
                    str(av), r"\d"
                ),
                c,
            ):
                return True
        return False

    def one_of(items: Any) -> str:
        if items and items[0][0] is NEGATE:
            return next((c for c in "aA0_-x~" if not member(c, items[1:])), "~")
        op, av = items[0]
        if op is LITERAL:
            return chr(av)
        if op is RANGE:
            return chr(av[0])
        if op is CATEGORY:
            return categories.get(str(av), "a")
        return "a"

    def build(tree: Any) -> str:
        out = []
        for op, av in tree:
            if op is LITERAL:
                out.append(chr(av))
            elif op is NOT_LITERAL:
                out.append("a" if av != ord("a") else "b")
            elif op is ANY:
                out.append("a")
            elif op is IN:
                out.append(one_of(av))
            elif op is BRANCH:
                out.append(min((build(b) for b in av[1]), key=len))
            elif op is SUBPATTERN:
                out.append(build(av[-1]))
            elif op in (MAX_REPEAT, MIN_REPEAT):
                lo, _hi, sub = av
                out.append(build(sub) * lo)
            elif op is AT:
                continue
        return "".join(out)

    text = build(_parser.parse(pattern))
    if re.fullmatch(pattern, text) is None:  # a negated class the guesses missed
        raise _refuse("pattern", f"no example string found for {pattern!r} on the sim engine.")
    return text
