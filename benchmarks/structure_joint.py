"""Latent structural diffusion against an RGB-only model on held-out two-object prompts (CPU).

``workflows/train_structure_shapes.yaml`` trains both from shapes-sd on the same two-object solid
scenes (same VAE, data, steps, batch, learning rate and seed; both conditioned on text and layout):
the **joint** model denoises RGB, depth and normal latents together, the **RGB-only** model the
render alone. For ``--prompts`` held-out two-object captions (the evaluation split, spread evenly),
each with ``--seeds`` seeds, both sample with the same noise seeds and, with ``--layout prompt``
(the default), the layout ``LayoutFromPrompt`` draws from the caption (``--layout none``: text only;
both models were trained with the layout dropped 10 % of the time). Measured in one process:

- the two-object evaluator (ShapeEval-pair) per image: **relation** accuracy, both objects'
  colour and shape, object count, **all-correct**; the joint model's relation error over the
  RGB-only model's, with a paired-bootstrap 95 % interval over images (target ≤ 0.7);
- the joint model's structure against its own image: IoU between the foreground of its predicted
  depth (depth > ``--depth-threshold``; the background is 0) and the objects segmented from its
  image against the plain background (``segment_objects``); and the mean absolute error between
  its predicted depth and the renderer's depth of the caption's layout (what was asked for);
- CPU seconds per image of each model (batched sampling, ``--threads``).

Usage::

    python benchmarks/structure_joint.py --joint OUT/shapes-structural --rgb OUT/shapes-structural-rgb \\
        --vae OUT/shapes-sd-structure-vae [--prompts 96] [--seeds 4] [--layout prompt|none] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESOLUTION = 64


def held_out_captions(count: int) -> list[str]:
    """``count`` two-object captions of the evaluation split, spread evenly over it."""
    from dagfusion.nodes.shapes.world import scenes

    pool = scenes("eval", 2)
    if count > len(pool):
        raise ValueError(f"the evaluation split has {len(pool)} two-object scenes, asked for {count}")
    step = len(pool) / count
    return [pool[int(i * step)].caption for i in range(count)]


def sample_all(model: Any, clip: Any, vae: Any, captions: list[str], seeds: int, *, steps: int, guidance: float,
               layout: str, batch: int) -> tuple[dict[str, torch.Tensor], float]:
    """Images, depths and normals of every (seed, caption), in that order, and the seconds per image."""
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.structure.layout import render_structure
    from dagfusion.nodes.structure.structural import sample_structural

    out: dict[str, list[torch.Tensor]] = {"image": [], "depth": [], "normal": []}
    began = time.perf_counter()
    for seed in range(seeds):
        for start in range(0, len(captions), batch):
            chunk = captions[start:start + batch]
            cond = encode_prompt(clip, chunk, "")
            drawn = render_structure(chunk, RESOLUTION, "solid")["layout"] if layout == "prompt" else None
            result = sample_structural(None, model, cond, vae, width=RESOLUTION, height=RESOLUTION, seed=1000 * seed + start,
                                       steps=steps, guidance_scale=guidance, layout=drawn, require_depth=False)
            for key in out:
                if result[key] is not None:
                    out[key].append(result[key].float().cpu())
    count = seeds * len(captions)
    return {k: torch.cat(v) for k, v in out.items() if v}, (time.perf_counter() - began) / count


def per_image(evaluator: Any, images: torch.Tensor, captions: list[str]) -> dict[str, list[float]]:
    """Per image, 1.0/0.0: each head of the two-object evaluator (relation, count, each object's
    colour and shape) and all-correct (two-object prompts: every head is scored)."""
    from dagfusion.nodes.metrics.pair_evaluator import SCORED, judge

    scores: dict[str, list[float]] = {k: [] for k in (*SCORED, "all_correct")}
    for right in judge(evaluator, images, captions):
        for key in SCORED:
            scores[key].append(float(right[key]))
        scores["all_correct"].append(float(all(right.values())))
    return scores


def ratio_interval(joint_errors: list[float], rgb_errors: list[float], rounds: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """Ratio of mean errors (joint / RGB-only) and its paired-bootstrap 95 % interval over images."""
    n = len(joint_errors)
    rng = random.Random(seed)

    def ratio(idx: list[int]) -> float:
        rgb, joint = sum(rgb_errors[i] for i in idx), sum(joint_errors[i] for i in idx)
        if not rgb:
            return float("nan") if not joint else float("inf")
        return joint / rgb

    point = ratio(list(range(n)))
    draws = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(rounds))
    return point, draws[int(0.025 * rounds)], draws[int(0.975 * rounds) - 1]


def structure_agreement(images: torch.Tensor, depth: torch.Tensor, asked_depth: torch.Tensor,
                        threshold: float) -> dict[str, float]:
    """Mean IoU of the depth foreground with the image's segmented objects, and the mean absolute
    depth error against the depth the caption's layout asks for."""
    from dagfusion.nodes.structure.maps import segment_objects

    masks, _ = segment_objects(images)
    objects = masks.amax(dim=1) > 0.5
    foreground = depth[:, 0] > threshold
    inter = (objects & foreground).flatten(1).sum(1).float()
    union = (objects | foreground).flatten(1).sum(1).float().clamp(min=1)
    return {"depth_foreground_iou": float((inter / union).mean()),
            "depth_mae_vs_layout": float((depth - asked_depth).abs().mean())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joint", required=True, help="the joint model's folder (SaveStructural)")
    parser.add_argument("--rgb", required=True, help="the RGB-only model's folder (SaveStructural)")
    parser.add_argument("--vae", required=True, help="the diffusers folder whose VAE (and text encoder) both trained with")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--layout", choices=("prompt", "none"), default="prompt")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--depth-threshold", type=float, default=0.1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= 1024 or not 1 <= args.seeds <= 16 or not 1 <= args.steps <= 200 or not 1 <= args.batch <= 256:
        parser.error("expected --prompts in 1..1024, --seeds in 1..16, --steps in 1..200 and --batch in 1..256")
    torch.set_num_threads(args.threads)

    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.metrics.pair_evaluator import SHIPPED, load_pair_evaluator
    from dagfusion.nodes.structure.layout import render_structure
    from dagfusion.nodes.structure.structural_io import load

    shared = load_diffusers_folder(Path(args.vae), source=f"benchmark:{args.vae}")
    models = {"joint": load(Path(args.joint), dtype="fp32"), "rgb-only": load(Path(args.rgb), dtype="fp32")}
    evaluator = load_pair_evaluator(SHIPPED)
    captions = held_out_captions(args.prompts)
    all_captions = captions * args.seeds
    asked_depth = render_structure(captions, RESOLUTION, "solid")["depth"].repeat(args.seeds, 1, 1, 1)

    results: dict[str, Any] = {"prompts": args.prompts, "seeds": args.seeds, "steps": args.steps,
                               "guidance": args.guidance, "layout": args.layout, "images": len(all_captions),
                               "parameters": {name: sum(p.numel() for p in m.module.parameters())
                                              for name, m in models.items()}}
    scores, made = {}, {}
    with torch.no_grad():
        for name, model in models.items():
            made[name], seconds = sample_all(model, shared.clip, shared.vae, captions, args.seeds, steps=args.steps,
                                             guidance=args.guidance, layout=args.layout, batch=args.batch)
            scores[name] = per_image(evaluator, made[name]["image"], all_captions)
            results[name] = {k: statistics.fmean(v) for k, v in scores[name].items()}
            results[name]["seconds_per_image"] = seconds
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    errors = {name: [1.0 - x for x in scores[name]["relation"]] for name in models}
    point, low, high = ratio_interval(errors["joint"], errors["rgb-only"])
    results["relation_error_ratio"] = [point, low, high]
    results["joint_structure"] = structure_agreement(made["joint"]["image"], made["joint"]["depth"], asked_depth,
                                                     args.depth_threshold)
    print(f"relation error, joint / RGB-only: {point:.2f} [{low:.2f}, {high:.2f}] (target <= 0.7)")
    print("joint model's structure: " + ", ".join(f"{k} {v:.3f}" for k, v in results["joint_structure"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
