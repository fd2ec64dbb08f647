"""Seconds per step and peak GPU memory of prompt-based TextCraftor training on a real-size SD 1.5 (GPU).

Random weights (seeded): one training step costs the same whatever the weights, so speed and
memory are measured faithfully without trained ones. Measured in one process, for every batch
size in ``--batches`` with gradient checkpointing on and off: ``--warmup`` + ``--repeats`` steps
of :func:`~dagfusion.nodes.textcraftor.loop.train_encoder` with the prompt-based variant (a DDIM
chain of ``--steps`` steps from noise at 512 px, classifier-free guidance 7.5, gradients through
the last ``--k`` steps and the VAE decoding), the whole text encoder trained (AdamW) against a
mean-brightness reward plus the embedding-alignment term. The time of each step is taken in the
``progress`` callback after ``torch.cuda.synchronize()``; the warm-up steps (the first includes
the set-up: the encoder's trainable copy, the optimizer) are dropped and the median reported.
Peak memory is ``torch.cuda.max_memory_allocated()`` over the run (reset before it; it includes
the frozen weights). An out-of-memory error is reported as ``"oom"`` for that row and the run
goes on. The ratios with / without checkpointing (time and memory) are given per batch size.

Architecture: the package's SD 1 configs — ``UNet2DConditionModel`` (320/640/1280/1280
channels, 768-d cross-attention), ``AutoencoderKL`` (128/256/512/512, factor 8), the
CLIP ViT-L/14 text encoder (12 layers, width 768, 77 tokens) — with the SD 1.5 noise schedule
(scaled-linear β 0.00085–0.012, ε-prediction) under DDIM. UNet and VAE in fp16, the encoder
trained in fp32 under bf16 autocast (``precision="auto"``). The tokenizer is a small offline
CLIP BPE vocabulary (only its ids matter here: prompts are padded to 77 tokens either way).

Usage (needs CUDA; prints a note and exits 0 without it)::

    python benchmarks/textcraftor_speed.py [--batches 1 4] [--steps 25] [--k 5] [--repeats 3] [--json out.json]
    python benchmarks/textcraftor_speed.py --dry-run   # the same code on the CPU with tiny configs (no speed numbers)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any

import torch
from dagfusion.nodes.rewards.base import Reward

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a red fox sitting in fresh snow, golden hour",
    "a bowl of ramen on a wooden table, studio lighting",
    "an isometric drawing of a tiny cozy library",
    "a portrait of an old fisherman, oil on canvas",
    "a futuristic city skyline at night, neon lights",
    "a macro photo of a dewdrop on a leaf",
]
GUIDANCE = 7.5
GiB = 1024 ** 3


class Brightness(Reward):
    """Mean pixel value of each image: a simple differentiable reward."""

    name = "brightness"
    _fingerprint = "brightness"

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


def scheduler_spec() -> Any:
    """SD 1.5's noise schedule (its PNDM config) as a DDIM scheduler."""
    from dagfusion.nodes.diffusion.data import SchedulerSpec

    return SchedulerSpec("DDIMScheduler", {
        "num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "timestep_spacing": "leading",
    })


def build(device: Any, dtype: Any, tiny: bool) -> dict[str, Any]:
    """Handles over the SD 1.5-size UNet and VAE (``dtype``) and the CLIP text encoder (fp32),
    random weights (seeded); ``tiny``: small variants of the same configs."""
    from dagfusion.model import ModelHandle, TextEncoderBundle, VAEHandle
    from dagfusion.nodes.diffusion.single_file import CONFIGS
    from dagfusion.testing.models import clip_tokenizer
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = CONFIGS / "sd1"
    unet_config = dict(UNet2DConditionModel.load_config(str(folder / "unet")))
    vae_config = dict(AutoencoderKL.load_config(str(folder / "vae")))
    text_config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
    if tiny:
        width = 32
        unet_config.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=width, attention_head_dim=4,
                           layers_per_block=1, sample_size=8, norm_num_groups=8)
        vae_config.update(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
        text_config = CLIPTextConfig(**{**text_config.to_dict(), "hidden_size": width, "intermediate_size": 37,
                                        "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": width,
                                        "vocab_size": 1000})
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        encoder = CLIPTextModel(text_config)
    unet = unet.to(device=device, dtype=dtype).eval()
    vae = vae.to(device=device, dtype=dtype).eval()
    encoder = encoder.to(device=device, dtype=torch.float32).eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return {
        "model": ModelHandle.from_module(unet, scheduler=scheduler_spec(), vae_scale_factor=scale),
        "vae": VAEHandle.from_module(vae),
        "clip": TextEncoderBundle.from_modules("clip", [encoder], [clip_tokenizer()]),
        "parameters": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("unet", unet), ("vae", vae), ("text_encoder", encoder))},
    }


def measure(parts: dict[str, Any], config: Any, warmup: int, device: Any) -> dict[str, Any]:
    """Median seconds per step (warm-up steps dropped) and peak memory (GiB, CUDA only) of one run."""
    from dagfusion.nodes.textcraftor.loop import train_encoder

    cuda = device.type == "cuda"
    stamps: list[float] = []

    def progress(done: int, total: int, values: dict[str, float]) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    train_encoder(parts["model"], parts["clip"], parts["vae"], Brightness(), PROMPTS, config, progress=progress)
    peak = torch.cuda.max_memory_allocated() / GiB if cuda else None
    times = [b - a for a, b in zip([began, *stamps], stamps)][warmup:]
    return {"status": "ok", "seconds_per_step": statistics.median(times), "peak_memory_gib": peak,
            "timed_steps": len(times)}


def ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the chain (N)")
    parser.add_argument("--k", type=int, default=5, help="last steps trained through (K)")
    parser.add_argument("--warmup", type=int, default=1, help="training steps dropped before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps (median reported)")
    parser.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU: checks the code, no speed numbers")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from dagfusion.nodes.textcraftor.loop import CraftConfig

    if args.dry_run:
        device, dtype, resolution, steps, k = torch.device("cpu"), torch.float32, 64, 3, 2
        warmup, repeats = 1, 1
        torch.set_num_threads(1)
        print("# DRY RUN on the CPU with tiny configs (64 px, 3 steps, K = 2, fp32): these are not speed numbers")
    else:
        if not torch.cuda.is_available():
            print("textcraftor_speed: needs CUDA; GPU numbers pending (run with --dry-run to check the code on the CPU)")
            return 0
        device, dtype, resolution, steps, k = torch.device("cuda"), torch.float16, 512, args.steps, args.k
        warmup, repeats = args.warmup, args.repeats
    parts = build(device, dtype, tiny=args.dry_run)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"# {name}, torch {torch.__version__}; UNet {parts['parameters']['unet'] / 1e6:.0f} M, "
          f"VAE {parts['parameters']['vae'] / 1e6:.0f} M, text encoder {parts['parameters']['text_encoder'] / 1e6:.0f} M "
          f"parameters; {resolution} px, N = {steps}, K = {k}, guidance {GUIDANCE}, "
          f"{warmup} warm-up + {repeats} timed steps per row")

    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        for checkpointing in (True, False):
            config = CraftConfig(variant="prompt", sample_steps=steps, grad_steps=k, guidance=GUIDANCE,
                                 resolution=resolution, steps=warmup + repeats, batch_size=batch, trainable="all",
                                 precision="auto", gradient_checkpointing=checkpointing, seed=0)
            row: dict[str, Any] = {"batch": batch, "gradient_checkpointing": checkpointing}
            out_of_memory = False
            try:
                row.update(measure(parts, config, warmup, device))
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
            except FloatingPointError as error:  # random weights in fp16 may overflow; the row says so
                row.update(status="nonfinite", seconds_per_step=None, peak_memory_gib=None, error=str(error))
            if out_of_memory:
                row.update(status="oom", seconds_per_step=None, peak_memory_gib=None)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)

    ratios = []
    for batch in args.batches:
        on, off = (next(r for r in rows if r["batch"] == batch and r["gradient_checkpointing"] is c) for c in (True, False))
        ratios.append({"batch": batch, "time_with_over_without": ratio(on["seconds_per_step"], off["seconds_per_step"]),
                       "memory_with_over_without": ratio(on["peak_memory_gib"], off["peak_memory_gib"])})

    def cell(value: Any, form: str, unit: str = "") -> str:
        return format(value, form) + unit if isinstance(value, (int, float)) else "–"

    print("| batch | checkpointing | s / step | peak GiB | status |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {'on' if r['gradient_checkpointing'] else 'off'} | {cell(r['seconds_per_step'], '.3f')} "
              f"| {cell(r['peak_memory_gib'], '.2f')} | {r['status']} |")
    for q in ratios:
        print(f"batch {q['batch']}: with / without checkpointing — time {cell(q['time_with_over_without'], '.2f', 'x')}, "
              f"memory {cell(q['memory_with_over_without'], '.2f', 'x')}")
    if args.dry_run:
        print("textcraftor_speed --dry-run: the code ran on tiny configs; no speed numbers are reported from a dry run")
    if args.json:
        result = {
            "device": name, "torch": torch.__version__, "dry_run": bool(args.dry_run),
            "parameters": parts["parameters"],
            "settings": {"resolution": resolution, "sample_steps": steps, "grad_steps": k, "guidance": GUIDANCE,
                         "warmup": warmup, "repeats": repeats, "trainable": "all",
                         "dtype": str(dtype).replace("torch.", ""), "precision": "auto"},
            "rows": rows, "ratios": ratios,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
