"""Every shipped weight file says where it came from: the training workflow and its hash, the
commit that shipped it, steps, data seed and stage, in its safetensors metadata."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _stamp_module():
    spec = importlib.util.spec_from_file_location("stamp_provenance", ROOT / "benchmarks" / "stamp_provenance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shipped() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    out = subprocess.run(["git", "ls-files", "*.safetensors"], cwd=ROOT, check=True, capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line]


def test_every_shipped_weight_file_carries_its_provenance() -> None:
    from safetensors import safe_open

    stamp = _stamp_module()
    files = _shipped()
    assert len(files) >= 7
    for name in files:
        with safe_open(str(ROOT / name), framework="pt") as handle:
            metadata = handle.metadata() or {}
        missing = [key for key in stamp.REQUIRED if not metadata.get(key)]
        assert not missing, f"{name} lacks {missing}: run python benchmarks/stamp_provenance.py"
        assert metadata["training_workflow"] == "unknown" or (ROOT / metadata["training_workflow"]).is_file(), name
        assert metadata["project_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", metadata["project_commit"]), name
        assert metadata["training_workflow_sha256"] == "unknown" or re.fullmatch(r"[0-9a-f]{64}", metadata["training_workflow_sha256"])
        assert metadata["steps"] == "unknown" or metadata["steps"].isdigit(), name
    # ... and it is what the table in the script says, the workflow hashes recomputed from git.
    assert [problem for name in files for problem in stamp.check(name)] == []


def test_stamping_changes_only_the_metadata(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import save_file

    stamp = _stamp_module()
    path = tmp_path / "w.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"b": torch.randn(3, 5, generator=g).half(), "a": torch.arange(7), "c": torch.randn(2, generator=g)},
              str(path), metadata={"format": "pt"})
    before = stamp.tensors_of(path)
    _, data = stamp.read_parts(path)
    assert stamp.write_metadata(path, {"format": "pt", "stage": "1 of 1", "note": 'quotes " and \u00e9'})
    assert not stamp.write_metadata(path, {"format": "pt", "stage": "1 of 1", "note": 'quotes " and \u00e9'})
    assert stamp.read_parts(path)[1] == data and stamp.tensors_of(path) == before
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "stage": "1 of 1", "note": 'quotes " and \u00e9'}


def test_a_digest_recorded_beside_a_stamped_file_follows_its_new_bytes(tmp_path: Path) -> None:
    import json

    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    stamp = _stamp_module()
    path = tmp_path / "structural.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"dagfusion_config": "{}"})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"weights": path.name, "weights_sha256": stamp.file_sha256(path), "format": "x"}))
    stamp.write_metadata(path, {"dagfusion_config": "{}", "stage": "1 of 1"})
    assert stamp.digest_document(path)[1]["weights_sha256"] != stamp.file_sha256(path)
    stamp.update_digest(path)
    document = json.loads(config.read_text())
    assert document["weights_sha256"] == stamp.file_sha256(path) and document["format"] == "x"
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    assert stamp.digest_document(other) is None  # the config names another file
