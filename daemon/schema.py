"""Request schemas: one JSON Schema per request body and data-channel message, used by the validator here and
by the OpenAPI document (`GET /v1/openapi.json`), so the docs and the checks cannot drift apart.

The validator knows the subset of JSON Schema the API uses (type, properties, required,
additionalProperties, enum, minimum/maximum, minLength/maxLength, pattern, min/maxProperties, anyOf, and oneOf
with a discriminator; a oneOf without one is documentation) and words its errors for people: the field's path,
what it must be and what to do, never a Python repr.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

MAX_DEPTH = 16  # no request nests deeper than 4; a body nested past this is refused before parsing
MAX_DIGITS = 1000  # whole numbers longer than this are not read (Python itself refuses over 4300 digits)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_KIND = {"object": "an object", "array": "a list", "string": "text", "integer": "a whole number",
         "number": "a number", "boolean": "true or false", "null": "null"}


class Invalid(ValueError):
    """A value that does not fit its schema. `status` 400: not JSON (or too deep); 422: JSON of the wrong shape."""

    def __init__(self, message: str, status: int = 422, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def depth(raw: bytes) -> int:
    """How deeply `raw` JSON nests, counted without parsing it (brackets inside strings do not count)."""
    text = np.frombuffer(_STRING.sub(b"", raw), np.uint8)
    if text.size == 0:
        return 0
    step = np.isin(text, (ord("["), ord("{"))).astype(np.int32) - np.isin(text, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def parse_json(raw: bytes | str, what: str = "the request body") -> Any:
    """JSON from `raw`, refusing (400) text that is not JSON, not UTF-8, non-finite numbers, whole numbers of
    more than MAX_DIGITS digits or nesting deeper than MAX_DEPTH; a bad `raw` never reaches a recursive parser."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(f"{what} is not UTF-8 text; send JSON encoded as UTF-8", 400, "malformed_json") from None
    if depth(raw.encode("utf-8", "surrogatepass")) > MAX_DEPTH:
        raise Invalid(f"{what} nests deeper than {MAX_DEPTH} levels; no request needs more than 4", 400,
                      "malformed_json")
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_int=lambda text: _bounded_int(text, what))
    except json.JSONDecodeError as e:
        raise Invalid(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", 400,
                      "malformed_json") from None


def _refuse_constant(name: str) -> Any:
    raise Invalid(f"JSON has no {name}; send a finite number", 400, "malformed_json")


def _bounded_int(text: str, what: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise Invalid(f"{what} has a number of more than {MAX_DIGITS} digits; no field takes one that large", 400,
                      "malformed_json")
    return int(text)


def kind_of(value: Any) -> str:
    """The JSON kind of a parsed value, as the messages name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def _fits_type(value: Any, kind: str) -> bool:
    return {
        "object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
        "boolean": isinstance(value, bool), "null": value is None,
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
    }[kind]


def check(schema: dict, value: Any, path: str = "") -> Any:
    """`value` if it fits `schema`; else raises Invalid naming the first field that does not."""
    where = f"'{path}'" if path else "the body"
    if "discriminator" in schema:  # oneOf, the branch picked by one field's value
        return check(_branch(schema, value, path), value, path)
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                return check(option, value, path)
            except Invalid:
                continue
        raise Invalid(f"{where} must be {describe(schema)}, not {kind_of(value)}")
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_fits_type(value, k) for k in kinds):
            raise Invalid(f"{where} must be {describe(schema)}, not {kind_of(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise Invalid(f"{where} must be one of {', '.join(json.dumps(v) for v in schema['enum'])}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(schema, value, where)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise Invalid(f"{where} must not be empty" if schema["minLength"] == 1
                          else f"{where} needs at least {schema['minLength']} characters")
        if len(value) > schema.get("maxLength", math.inf):
            raise Invalid(f"{where} is longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.fullmatch(schema["pattern"], value):
            raise Invalid(f"{where} must be {schema.get('description', 'of the documented form')}")
    if isinstance(value, dict):
        _check_object(schema, value, path)
    return value


def _branch(schema: dict, value: Any, path: str) -> dict:
    """The `oneOf` branch whose discriminating field (`discriminator.propertyName`, an enum of one value in each
    branch) has `value`'s value; raises Invalid naming that field when none has."""
    tag = schema["discriminator"]["propertyName"]
    branches = {b["properties"][tag]["enum"][0]: b for b in schema["oneOf"]}
    where = f"'{path}.{tag}'" if path else f"'{tag}'"
    choices = ", ".join(json.dumps(k) for k in branches)
    if not isinstance(value, dict):
        raise Invalid(f"{repr_key(path) if path else 'the body'} must be an object with a '{tag}' field")
    if tag not in value:
        raise Invalid(f"missing field {where}: one of {choices}")
    if not isinstance(value[tag], str) or value[tag] not in branches:
        raise Invalid(f"{where} must be one of {choices}")
    return branches[value[tag]]


def _check_number(schema: dict, value: float, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # a whole number of any size is finite
        raise Invalid(f"{where} must be a finite number")
    low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
    if not low <= value <= high:
        raise Invalid(f"{where} must be within [{low:g}, {high:g}]")


def _check_object(schema: dict, value: dict, path: str) -> None:
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    if len(value) > schema.get("maxProperties", math.inf):
        raise Invalid(f"{repr_key(path) if path else 'the body'} has more than {schema['maxProperties']} fields")
    if len(value) < schema.get("minProperties", 0):
        where = repr_key(path) if path else "the body"
        raise Invalid(f"{where} is empty; send at least one of: {', '.join(props)}")
    unknown = [k for k in value if k not in props] if extra is False else []
    if unknown:
        where = f"in '{path}'" if path else "in the body"
        allowed = ", ".join(props) or "none"
        raise Invalid(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(repr_key(k) for k in unknown)} "
                      f"{where}; the fields are: {allowed}")
    missing = [k for k in schema.get("required", ()) if k not in value]
    if missing:
        raise Invalid(f"missing field {', '.join(repr_key(k) for k in missing)} "
                      f"{'in ' + repr_key(path) if path else 'in the body'}")
    for key, item in value.items():
        sub = props.get(key, extra if isinstance(extra, dict) else None)
        if sub is not None:
            check(sub, item, f"{path}.{key}" if path else key)


def repr_key(key: str) -> str:
    """A field name as messages quote it: cut short, control characters shown as escapes."""
    text = json.dumps(key[:40])[1:-1]
    return f"'{text}{'...' if len(key) > 40 else ''}'"


def describe(schema: dict) -> str:
    """What a value of `schema` must be, in words (for messages)."""
    if "description" in schema and "pattern" in schema:
        return schema["description"]
    if "anyOf" in schema:
        return " or ".join(describe(s) for s in schema["anyOf"])
    if "discriminator" in schema:
        return f"an object with a '{schema['discriminator']['propertyName']}' field"
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    text = " or ".join(_KIND[k] for k in kinds) or "a JSON value"
    if "minimum" in schema or "maximum" in schema:
        text += f" in [{schema.get('minimum', -math.inf):g}, {schema.get('maximum', math.inf):g}]"
    return text
