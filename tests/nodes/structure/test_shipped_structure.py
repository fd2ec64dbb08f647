"""The shipped two-object structure models: the joint structural model (shapes-structural), the
refiner's base (shapes-sd-two-objects) and the structure-guided refiner (shapes-refiner). They load
by name, carry their provenance, fit each other, and on a fixed held-out subset hold the accuracy
measured on it (docs/structural.md)."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch

SUBSET_PROMPTS = 48
"""The fixed subset: ``SUBSET_PROMPTS`` held-out two-object captions of ``benchmarks/structure_refiner.py``
(spread evenly over the evaluation split), one seed, 25 steps, guidance 4."""

MEASURED = {"joint": 0.125, "refiner": 0.1042}
"""All-correct of each stage on the subset (6 and 5 of 48), measured with this test's own code on
this CPU; each floor is its value minus 5 points. Over 96 prompts x 4 seeds (docs/structural.md)
they read 0.133 and 0.167: the subset is small, and its order of the two is not the larger one's."""


class _Ctx:
    device = "cpu"

    class settings:  # noqa: N801 - a stand-in for the run's settings
        model_cache_bytes = 2**31


def test_the_shipped_structure_models_load_by_name_with_their_provenance() -> None:
    from safetensors import safe_open

    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.structure.controlnet import embedded_path, load_embedded_controlnet
    from dagfusion.nodes.structure.controlnet_model import fit_problems
    from dagfusion.nodes.structure.structural import embedded_structural_folder, load_embedded_structural

    joint = load_embedded_structural.fn(_Ctx(), "shapes-structural", "cpu", "auto")
    assert joint["report"]["targets"] == ["rgb", "depth", "normal"] and joint["report"]["layout_channels"] == 2
    assert next(joint["model"].module.parameters()).dtype == torch.float32  # fp16 on disk, fp32 on the CPU
    refiner = load_embedded_controlnet.fn(_Ctx(), "shapes-refiner", "cpu", "fp32")
    assert refiner.conditioning_channels == 6

    from dagfusion.nodes.diffusion.loading import load_diffusers_folder

    base = load_diffusers_folder(folder("shapes-sd-two-objects"), source="test")
    assert fit_problems(refiner.info, base.model.denoiser) == []
    files = {
        embedded_structural_folder("shapes-structural") / "structural.safetensors": "workflows/train_structure_shapes.yaml",
        embedded_path("shapes-refiner"): "workflows/train_structure_refiner.yaml",
        folder("shapes-sd-two-objects") / "unet" / "diffusion_pytorch_model.safetensors": "workflows/train_structure_refiner.yaml",
    }
    for path, workflow in files.items():
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        assert metadata["training_workflow"] == workflow and metadata["steps"] == "2000", path


@pytest.mark.slow
@pytest.mark.usefixtures("both_cores")
def test_both_stages_hold_their_measured_accuracy_on_held_out_prompts(benchmark_module: Any) -> None:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.metrics.pair_evaluator import SHIPPED, load_pair_evaluator
    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.structure.controlnet import embedded_path
    from dagfusion.nodes.structure.controlnet_model import load_controlnet
    from dagfusion.nodes.structure.structural import embedded_structural_folder
    from dagfusion.nodes.structure.structural_io import load

    bench = benchmark_module("structure_refiner")
    base = load_diffusers_folder(folder("shapes-sd-two-objects"), source="test")
    joint = load(embedded_structural_folder("shapes-structural"), dtype="fp32")
    refiner = load_controlnet(embedded_path("shapes-refiner"))
    captions = bench.held_out_captions(SUBSET_PROMPTS)
    with torch.no_grad():
        images, _ = bench.run_stages(joint, base, refiner, captions, 1, conditions=bench.CONDITIONS, steps=25,
                                     guidance=4.0, batch=16, strength=1.0, with_base=False)
    evaluator = load_pair_evaluator(SHIPPED)
    got = {name: statistics.fmean(bench.per_image(evaluator, images[name], captions)["all_correct"])
           for name in MEASURED}
    print("all-correct on the subset:", got)
    for name, measured in MEASURED.items():
        assert got[name] >= measured - 0.05, (name, got[name], measured)
