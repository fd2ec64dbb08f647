"""Reading workflows from YAML and PNG files, paths or bytes: :mod:`dagfusion.sources`."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

import dagfusion.sources as sources
from dagfusion import ValidationError, load_workflow
from dagfusion.pngmeta import png_info
from dagfusion.sources import read_source, read_text

YAML = "format_version: 1\nnodes:\n  a: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}\n"


def png_bytes(workflow_yaml: str | None) -> bytes:
    buffer = io.BytesIO()
    info = png_info(workflow_yaml) if workflow_yaml is not None else None
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_yaml_file_and_yaml_bytes(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(YAML, encoding="utf-8")
    workflow, problems = read_source(path)
    assert problems == [] and workflow is not None
    assert list(workflow.nodes) == ["a"] and workflow.source == str(path)
    from_bytes, problems = read_source(YAML.encode(), name="upload.yaml")
    assert problems == [] and from_bytes == workflow and from_bytes.source == "upload.yaml"


def test_png_with_a_workflow(tmp_path: Path) -> None:
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes(YAML))
    workflow, problems = read_source(path)
    assert problems == [] and workflow is not None and list(workflow.nodes) == ["a"]
    found, _ = read_text(path)
    assert found is not None and found.kind == "png" and found.name == str(path)
    from_bytes, problems = read_source(path.read_bytes(), name="picture.png")
    assert problems == [] and from_bytes == workflow
    assert load_workflow(path) == workflow  # load_workflow reads PNGs through the same reader


def test_png_without_a_workflow(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    path.write_bytes(png_bytes(None))
    for source in (path, path.read_bytes()):
        workflow, problems = read_source(source)
        assert workflow is None and [p.code for p in problems] == ["no-workflow"]


def test_structural_problems_come_back_with_the_workflow(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(YAML + "extra: 1\n", encoding="utf-8")
    workflow, problems = read_source(path)
    assert workflow is not None and [p.code for p in problems] == ["unknown-key"]
    with pytest.raises(ValidationError) as info:
        load_workflow(path)
    assert info.value.problems[0].code == "unknown-key"


def test_too_large_files_are_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yaml_path = tmp_path / "big.yaml"
    yaml_path.write_text(YAML, encoding="utf-8")
    png_path = tmp_path / "big.png"
    png_path.write_bytes(png_bytes(YAML))
    monkeypatch.setattr(sources, "MAX_YAML_BYTES", 10)
    monkeypatch.setattr(sources, "MAX_PNG_BYTES", 10)
    read: list[object] = []
    monkeypatch.setattr(sources, "read_png_text", lambda *a: read.append(a) or {})
    for source, code in ((yaml_path, "yaml-too-large"), (png_path, "png-too-large")):
        for given in (source, source.read_bytes()):
            workflow, problems = read_source(given)
            assert workflow is None and [p.code for p in problems] == [code]
    assert read == []


def test_unreadable_sources(tmp_path: Path) -> None:
    missing, problems = read_source(tmp_path / "missing.yaml")
    assert missing is None and [p.code for p in problems] == ["unreadable"]
    folder, problems = read_source(tmp_path)
    assert folder is None and [p.code for p in problems] == ["unreadable"]
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.yaml"
        os.mkfifo(fifo)
        workflow, problems = read_source(fifo)  # refused without opening: would block forever
        assert workflow is None and [p.code for p in problems] == ["unreadable"]
        assert "not a regular file" in problems[0].message
    with pytest.raises(ValidationError) as info:
        load_workflow(tmp_path / "missing.yaml")
    assert info.value.problems[0].code == "unreadable"
