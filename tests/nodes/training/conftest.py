"""Fixtures for the training pack: tiny SD handles, a 32 px shapes dataset, small configs, helpers.

Everything trains the tiny SD model of :mod:`dagfusion.testing.models` (random weights
from fixed seeds; nothing is downloaded) for a handful of steps on one CPU thread.
"""

from __future__ import annotations

import textwrap
import traceback
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")



@pytest.fixture(scope="session")
def parts() -> dict[str, Any]:
    """In-memory handles over the tiny SD model: model, clip, vae, scheduler …"""
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


@pytest.fixture(scope="session")
def shapes() -> Any:
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return ShapesDataset(split="train", resolution=32, seed=0)


def state(module: Any) -> dict[str, Any]:
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical state dicts."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def workflow(text: str) -> Any:
    from dagfusion.workflow import load_workflow

    body = textwrap.dedent(text).strip("\n")
    if not body.startswith("format_version"):
        body = "format_version: 1\n" + body
    return load_workflow(body + "\n", text=True)


def run_ok(engine: Any, text_or_workflow: Any, out: Any, **options: Any) -> Any:
    """Run a workflow and fail with every node's traceback unless it succeeded."""
    wf = workflow(text_or_workflow) if isinstance(text_or_workflow, str) else text_or_workflow
    result = engine.run(wf, out=out, **options)
    if result.status != "ok":
        details = "\n".join("".join(traceback.format_exception(e.original)) for e in result.errors.values())
        pytest.fail(f"run {result.status}: {list(result.errors)}\n{details}")
    return result


@pytest.fixture(scope="session")
def helpers() -> Any:
    """The helpers above (test modules cannot import conftest under importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(state=state, assert_same=assert_same, workflow=workflow, run_ok=run_ok)
