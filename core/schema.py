"""A JSON Schema of the workflow format, specialised to the registered node types.

Editors use it for completion and checks (``dagfusion schema > workflow.schema.json``); each
registered node type contributes a branch listing its inputs, so a typo in an input name is
flagged while typing. The schema checks shape only; :func:`dagfusion.validate` remains the
authority (types of links, bounds, cycles).
"""

from __future__ import annotations

from typing import Any

from dagfusion.node import REQUIRED, InputSpec
from dagfusion.registry import Registry
from dagfusion.workflow import FORMAT_VERSION

SCHEMA_ID = "https://dagfusion.dev/schema/workflow-v1.json"

_JSON_TYPES = {
    "INT": {"type": "integer"},
    "SEED": {"type": "integer", "minimum": 0},
    "FLOAT": {"type": "number"},
    "BOOLEAN": {"type": "boolean"},
    "STRING": {"type": "string"},
    "PATH": {"type": "string"},
    "LIST": {"type": "array"},
    "DICT": {"type": "object"},
}

LINK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A link to another node's output: {from: node.output}",
    "properties": {"from": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_-]*\.[A-Za-z_][A-Za-z0-9_]*$"}},
    "required": ["from"],
    "additionalProperties": False,
}


def _input_schema(spec: InputSpec) -> dict[str, Any]:
    constant: dict[str, Any] = dict(_JSON_TYPES.get(spec.type_name, {}))
    if spec.choices is not None:
        constant["enum"] = list(spec.choices)
    if spec.min is not None:
        constant["minimum"] = spec.min
    if spec.max is not None:
        constant["maximum"] = spec.max
    if spec.exclusive_min is not None:
        constant["exclusiveMinimum"] = spec.exclusive_min
    if spec.exclusive_max is not None:
        constant["exclusiveMaximum"] = spec.exclusive_max
    out: dict[str, Any] = {"description": f"{spec.type_name}. {spec.description}".strip()}
    if spec.default is not REQUIRED and isinstance(spec.default, (int, float, str, bool, list)) :
        out["default"] = spec.default
    if spec.link_only or not constant:
        out["anyOf"] = [{"$ref": "#/$defs/link"}] if spec.link_only else [{"$ref": "#/$defs/link"}, {}]
    else:
        out["anyOf"] = [{"$ref": "#/$defs/link"}, constant]
    return out


def workflow_schema(registry: Registry) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of workflow files for ``registry``'s node types."""
    node_branches = []
    for spec in sorted(registry, key=lambda s: s.type_id):
        node_branches.append(
            {
                "if": {"properties": {"type": {"const": spec.type_id}}, "required": ["type"]},
                "then": {
                    "properties": {
                        "inputs": {
                            "type": "object",
                            "properties": {i.name: _input_schema(i) for i in spec.inputs},
                            "required": [i.name for i in spec.inputs if i.required],
                            "additionalProperties": False,
                        }
                    }
                },
            }
        )
    node_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": sorted(s.type_id for s in registry)},
            "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
            "bypass": {"type": "boolean", "description": "skip the node; each output passes on its input of the same type"},
            "inputs": {"type": "object"},
            "ui": {"type": "object"},
        },
        "required": ["type"],
        "additionalProperties": False,
        "allOf": node_branches,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "dagfusion workflow",
        "type": "object",
        "properties": {
            "format_version": {"type": "integer", "minimum": 1, "maximum": FORMAT_VERSION},
            "metadata": {"type": "object"},
            "nodes": {
                "type": "object",
                "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_-]*$"},
                "additionalProperties": {"$ref": "#/$defs/node"},
                "minProperties": 1,
            },
            "outputs": {"type": "array", "items": {"type": "string"}},
            "sweep": {
                "anyOf": [
                    {"type": "array", "items": {"$ref": "#/$defs/sweepGroup"}},
                    {"$ref": "#/$defs/sweepGroup"},
                ]
            },
            "ui": {"type": "object"},
        },
        "required": ["format_version", "nodes"],
        "additionalProperties": False,
        "$defs": {
            "link": LINK_SCHEMA,
            "node": node_schema,
            "sweepGroup": {"type": "object", "additionalProperties": {"type": "array", "minItems": 1}},
        },
    }
