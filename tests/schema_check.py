"""A small JSON-schema validator for the structured-output tests (jsonschema is not a dependency).

Covers what the tests' schemas use: type (one or a list), properties, required, additionalProperties: false,
items, enum, const, minimum/maximum, minLength/maxLength, minItems/maxItems, anyOf, $ref to #/$defs. Raises
AssertionError naming the path of the first violation.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None, path: str = "$") -> None:
    root = root if root is not None else schema
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), f"unsupported $ref {ref}"
        return validate(value, root["$defs"][ref.removeprefix("#/$defs/")], root, path)
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                return validate(value, sub, root, path)
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{path}: matches no anyOf branch: {errors}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(_TYPES[t](value) for t in types), f"{path}: {value!r} is not of type {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != {schema['const']!r}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{path}: {value} < {schema['minimum']}"
    if "maximum" in schema:
        assert value <= schema["maximum"], f"{path}: {value} > {schema['maximum']}"
    if isinstance(value, str):
        assert len(value) >= schema.get("minLength", 0), f"{path}: too short"
        assert len(value) <= schema.get("maxLength", len(value)), f"{path}: too long"
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0), f"{path}: too few items"
        assert len(value) <= schema.get("maxItems", len(value)), f"{path}: too many items"
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), root, f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing required {key!r}"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"{path}: unexpected properties {sorted(extra)}"
        for key, item in value.items():
            if key in props:
                validate(item, props[key], root, f"{path}.{key}")


# Schemas with nested objects, arrays, enums and bounded values, shared by the engine and server tests.
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["king", "queen", "fool"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 20},
            "acts": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "number": {"type": "integer", "minimum": 1, "maximum": 5},
                        "scenes": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
                    },
                    "required": ["number", "scenes"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["title", "acts"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "place": {
                "type": "object",
                "properties": {"city": {"enum": ["Verona", "Mantua"]}, "inside": {"type": "boolean"}},
                "required": ["city", "inside"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "where": {"$ref": "#/$defs/place"},
            "mood": {"anyOf": [{"type": "null"}, {"enum": ["merry", "sad"]}]},
            "lines": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
        },
        "required": ["where", "mood", "lines"],
        "additionalProperties": False,
    },
]
