"""The shipped shapes ControlNet: it loads by name, carries its provenance, and on held-out
prompts makes shapes-sd's objects follow the given mask more closely than without it, keeping the
attributes (guess mode at strength 2 over the whole run, as documented)."""

from __future__ import annotations

import statistics
from typing import Any

import pytest


def test_the_shipped_controlnet_loads_by_name_with_its_provenance() -> None:
    from safetensors import safe_open

    from dagfusion.nodes.structure.controlnet import embedded_path, load_embedded_controlnet

    with safe_open(str(embedded_path("shapes-mask")), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["training_workflow"] == "workflows/train_controlnet_shapes.yaml"
    assert metadata["steps"] == "4000" and metadata["stage"] == "2 of 2"

    class _Ctx:
        device = "cpu"

        class settings:  # noqa: N801 - a stand-in for the run's settings
            model_cache_bytes = 2**31

    handle = load_embedded_controlnet.fn(_Ctx(), "shapes-mask", "cpu", "fp32")
    assert int(handle.module.config.conditioning_channels) == 1


PROMPTS = 48
"""Held-out prompts of the quality check (one seed each, sampled as one batch)."""


def _images(model: Any, clip: Any, vae: Any, captions: list[str]) -> Any:
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import decode

    latent = empty_latent(model, 64, 64, len(captions))
    return decode(vae, sample(model, encode_prompt(clip, captions, ""), latent, steps=25, guidance_scale=4.0, seed=0))


@pytest.mark.slow
@pytest.mark.usefixtures("both_cores")
def test_the_shipped_controlnet_follows_held_out_masks_and_keeps_the_attributes(benchmark_module: Any) -> None:
    # the documented setting (guess mode, strength 2, the whole run) on 48 held-out prompts: this
    # subset measured object mask IoU 0.704 unguided and 0.824 guided, all-correct 0.938 and 0.979;
    # the floors sit a few points under those
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.structure.controlnet import ControlNetPatch, embedded_path
    from dagfusion.nodes.structure.controlnet_model import load_controlnet
    from dagfusion.nodes.structure.metrics import mask_iou

    bench = benchmark_module("structure_shapes")
    loaded = load_diffusers_folder(folder("shapes-sd"))
    controlnet = load_controlnet(embedded_path("shapes-mask"))
    _, masks, captions, _ = bench.ground_truth(bench.held_out_prompts(PROMPTS), 1)
    plain = _images(loaded.model, loaded.clip, loaded.vae, captions)
    patch = ControlNetPatch(controlnet, masks, strength=2.0, guess_mode=True)
    guided = _images(loaded.model.with_patch(patch), loaded.clip, loaded.vae, captions)
    plain_iou, guided_iou = statistics.fmean(mask_iou(plain, masks)), statistics.fmean(mask_iou(guided, masks))
    evaluator = load_shapeeval(SHIPPED)
    plain_ok, guided_ok = score(evaluator, plain, captions)["all_correct"], score(evaluator, guided, captions)["all_correct"]
    print("IoU", plain_iou, guided_iou, "all-correct", plain_ok, guided_ok)
    assert guided_iou >= 0.824 - 0.03 and guided_iou > plain_iou + 0.09, (plain_iou, guided_iou)
    assert guided_ok >= 0.979 - 0.05, (plain_ok, guided_ok)
