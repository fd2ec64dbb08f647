"""Quality and CPU sampling time of the embedded shapes models (shapes-sd, shapes-dit).

For each shipped model, on the held-out evaluation prompts of the shapes world (attribute
combinations never trained on; single objects), at 8, 25 and 50 sampling steps:

- **ShapeEval**: all-correct and per-attribute accuracy of the generated images against their
  prompts (the shipped classifier reads 1.000 on rendered held-out images);
- **FD-shapes**: Fréchet distance between ShapeEval features of the generated images and of as
  many renders of the same prompts (not FID: the features are the shapes classifier's);
- **time**: wall-clock seconds to sample one image (batch 1, CFG, VAE decode included) on this
  machine's CPU, median of ``--repeats`` runs, all measured in this one process.

``--pipeline`` also samples every prompt through diffusers' own pipeline class
(``DiffusionPipeline.from_pretrained(folder)``), 25 steps, and scores it: the folder must sample
correctly outside dagfusion too.

Usage::

    python benchmarks/shapes_models.py                 # both models, 2 seeds per prompt
    python benchmarks/shapes_models.py --models shapes-sd --seeds 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

STEPS = (8, 25, 50)


def batch_conditioning(clip: Any, prompts: list[str]) -> Any:
    """One conditioning holding every prompt's row (negative: the empty prompt)."""
    from dagfusion.nodes.diffusion.data import Conditioning
    from dagfusion.nodes.diffusion.text import encode_prompt

    rows = [encode_prompt(clip, p, "") for p in prompts]
    positive = {k: torch.cat([r.positive[k] for r in rows]) for k in rows[0].positive}
    negative = {k: torch.cat([r.negative[k] for r in rows]) for k in rows[0].negative} if rows[0].negative else None
    return Conditioning(rows[0].kind, positive, negative, {"prompts": prompts})


def generate(loaded: Any, prompts: list[str], steps: int, guidance: float, seed: int, chunk: int = 96) -> Any:
    """Images (N, 3, 64, 64) in [0, 1] for ``prompts``, ``chunk`` at a time, seeded per chunk."""
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode

    images = []
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        cond = batch_conditioning(loaded.clip, part)
        latent = empty_latent(loaded.model, 64, 64, len(part))
        out = sample(loaded.model, cond, latent, steps=steps, guidance_scale=guidance, seed=seed * 1000 + i)
        images.append(decode(loaded.vae, out))
    return torch.cat(images)


def renders(prompts: list[str], seed: int) -> Any:
    """Rendered images of ``prompts`` (with the dataset's jitter), the reference for FD-shapes."""
    from dagfusion.nodes.shapes.render import render_batch
    from dagfusion.nodes.shapes.world import parse_caption

    scenes = [parse_caption(p) for p in prompts]
    return render_batch(scenes, 64, seed, 0, True).image[:, :3]


def time_one(loaded: Any, prompt: str, steps: int, guidance: float, repeats: int) -> float:
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import decode

    times = []
    for r in range(repeats + 1):
        began = time.perf_counter()
        cond = encode_prompt(loaded.clip, prompt, "")
        out = sample(loaded.model, cond, empty_latent(loaded.model, 64, 64, 1), steps=steps, guidance_scale=guidance, seed=r)
        decode(loaded.vae, out)
        if r:  # the first run warms up
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def pipeline_check(name: str, prompts: list[str], guidance: float, evaluator: Any) -> dict[str, float]:
    """ShapeEval of images sampled by diffusers' own pipeline from the shipped folder (25 steps)."""
    from diffusers import DiffusionPipeline

    from dagfusion.nodes.metrics.evaluator import score
    from dagfusion.nodes.shapes.models import folder

    pipe = DiffusionPipeline.from_pretrained(str(folder(name)), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {"clean_caption": False, "use_resolution_binning": False} if "PixArt" in type(pipe).__name__ else {}
    images = []
    for i in range(0, len(prompts), 48):
        out = pipe(prompts[i:i + 48], num_inference_steps=25, guidance_scale=guidance, height=64, width=64,
                   generator=torch.Generator().manual_seed(i), output_type="pt", **extra)
        images.append(out.images)
    return score(evaluator, torch.cat(images), prompts)


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.metrics.evaluator import load_shapeeval, score
    from dagfusion.nodes.metrics.frechet import frechet_distance
    from dagfusion.nodes.shapes.models import EMBEDDED, folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["shapes-sd", "shapes-dit"], choices=list(EMBEDDED))
    parser.add_argument("--seeds", type=int, default=2, help="images per held-out prompt")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step count (median)")
    parser.add_argument("--pipeline", action="store_true", help="also sample through diffusers' own pipeline")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    from dagfusion.nodes.metrics.evaluator import SHIPPED

    evaluator = load_shapeeval(SHIPPED)
    prompts = ShapesDataset(split="eval").prompts() * args.seeds
    reference = renders(prompts, seed=123)
    with torch.no_grad():
        reference_features = evaluator.embed(reference)
    print(f"# shapes models on {len(prompts)} held-out prompts ({args.seeds} per combination), guidance {args.guidance}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    results: dict[str, Any] = {}
    for name in args.models:
        loaded = load_diffusers_folder(folder(name), dtype="fp32", device="cpu", source=f"embedded:{name}")
        size = sum(f.stat().st_size for f in folder(name).rglob("*.safetensors"))
        params = sum(p.numel() for p in loaded.model.denoiser.parameters())
        rows = {}
        for steps in STEPS:
            with torch.no_grad():
                images = generate(loaded, prompts, steps, args.guidance, seed=0)
                scores = score(evaluator, images, prompts)
                fd = frechet_distance(evaluator.embed(images), reference_features)
            seconds = time_one(loaded, prompts[0], steps, args.guidance, args.repeats)
            rows[steps] = {**{k: round(v, 4) for k, v in scores.items()}, "fd_shapes": round(fd, 3),
                           "seconds_per_image": round(seconds, 3)}
        results[name] = {"denoiser_parameters": params, "weights_bytes": size, "steps": rows}
        if args.pipeline:
            results[name]["diffusers_pipeline_25_steps"] = pipeline_check(name, prompts, args.guidance, evaluator)
        print(f"\n## {name}: denoiser {params / 1e6:.2f} M parameters, weights {size / 1e6:.1f} MB (fp16)")
        attrs = [k for k in rows[STEPS[0]] if k not in ("all_correct", "fd_shapes", "seconds_per_image")]
        print("| steps | all-correct | " + " | ".join(attrs) + " | FD-shapes | s / image (CPU) |")
        print("|---" * (len(attrs) + 4) + "|")
        for steps, row in rows.items():
            print(f"| {steps} | {row['all_correct']:.3f} | " + " | ".join(f"{row[a]:.3f}" for a in attrs)
                  + f" | {row['fd_shapes']:.2f} | {row['seconds_per_image']:.3f} |")
        if args.pipeline:
            check = results[name]["diffusers_pipeline_25_steps"]
            print(f"diffusers pipeline, 25 steps: all-correct {check['all_correct']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
