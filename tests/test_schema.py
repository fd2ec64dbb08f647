from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from dagfusion.registry import Registry
from dagfusion.schema import workflow_schema

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator(registry: Registry) -> jsonschema.Draft202012Validator:
    schema = workflow_schema(registry)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflows_match_the_schema(validator, path: Path) -> None:
    assert list(validator.iter_errors(yaml.safe_load(path.read_text()))) == []


def test_schema_flags_editor_mistakes(validator) -> None:
    good = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflows" / "blurred_noise.yaml").read_text())
    typo = copy.deepcopy(good)
    typo["nodes"]["blur"]["inputs"]["sigmaa"] = 1.0
    bad_choice = copy.deepcopy(good)
    bad_choice["nodes"]["noise"]["inputs"]["distribution"] = "gamma"
    unknown_type = copy.deepcopy(good)
    unknown_type["nodes"]["blur"]["type"] = "dagfusion.tensor.Blr"
    for document in (typo, bad_choice, unknown_type):
        assert list(validator.iter_errors(document)), document
