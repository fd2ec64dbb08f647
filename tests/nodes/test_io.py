from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from dagfusion import Engine
from dagfusion.workflow import load_workflow


def test_save_and_load_tensor_round_trip(engine: Engine, tmp_path: Path) -> None:
    source = tmp_path / "in.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(source))
    wf = load_workflow(
        textwrap.dedent(
            f"""\
            format_version: 1
            nodes:
              load: {{type: dagfusion.io.LoadTensor, inputs: {{path: "{source}", key: w}}}}
              save: {{type: dagfusion.io.SaveTensor, inputs: {{tensor: {{from: load.tensor}}, filename: sub/out.safetensors}}}}
              png: {{type: dagfusion.io.SaveTensorPNG, inputs: {{tensor: {{from: load.tensor}}, filename: p.png}}}}
            """
        ),
        text=True,
    )
    result = engine.run(wf, out=tmp_path / "run")
    assert result.ok, result.errors
    saved = Path(result.output("save.path"))
    assert saved == (tmp_path / "run" / "sub" / "out.safetensors").resolve()
    with Image.open(result.output("png.path")) as image:
        assert image.size == (3, 2) and image.mode == "L"


def test_missing_key_and_escaping_output_are_clear_errors(engine: Engine, tmp_path: Path) -> None:
    source = tmp_path / "in.safetensors"
    save_file({"w": torch.zeros(1)}, str(source))
    wf = load_workflow(
        textwrap.dedent(
            f"""\
            format_version: 1
            nodes:
              load: {{type: dagfusion.io.LoadTensor, inputs: {{path: "{source}", key: nope}}}}
              text: {{type: dagfusion.io.SaveText, inputs: {{text: hi, filename: ../../escape.txt}}}}
            """
        ),
        text=True,
    )
    result = engine.run(wf, out=tmp_path / "run")
    assert "has no tensor 'nope'; it holds ['w']" in str(result.errors["load"])
    assert "must not contain '..'" in str(result.errors["text"])
    assert not (tmp_path / "escape.txt").exists()
