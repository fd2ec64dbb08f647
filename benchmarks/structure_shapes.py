"""Structure-guided generation on the shapes world (CPU): the shapes ControlNet for shapes-sd.

For held-out prompts (the evaluation split's single-object combinations: all 96 by default, or
``--prompts N`` spread evenly), each
with ``--seeds`` seeds, the ground-truth render of the prompt (flat style, jittered by the seed)
gives the object mask the ControlNet is guided by. Measured in one process, one torch thread:

- **object mask IoU** (:func:`dagfusion.nodes.structure.metrics.mask_iou`, objects segmented
  against the plain background) between each generated image and the ground-truth mask, for
  shapes-sd unguided and with the ControlNet;
- the **ceiling**: the same IoU for the ground-truth render itself after the VAE round trip, and
  for the render shifted by one pixel (how much a 1-px error alone costs);
- **ShapeEval** per attribute and all-correct of both against their prompts (the ControlNet must not
  cost attributes), and of the render after the VAE round trip (what an image that follows the
  mask exactly can score);
- all-correct of the ControlNet's images minus the unguided ones', with a paired-bootstrap 95 %
  interval over images (target ≥ 0);
- CPU seconds per image of each.

The ratio guided IoU / ceiling is the headline (target ≥ 0.95).

Usage::

    python benchmarks/structure_shapes.py --controlnet path/to/shapes-controlnet-mask.safetensors [--guess-mode --strength 2] [--prompts 96] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def held_out_prompts(count: int, split: str = "eval") -> list[Any]:
    """``count`` single-object scenes of ``split``, spread evenly over it (``"train"``: a validation set
    for choosing settings without looking at the held-out combinations)."""
    from dagfusion.nodes.shapes.world import scenes

    pool = scenes(split, 1)
    step = len(pool) / count
    return [pool[int(i * step)] for i in range(count)]


def ground_truth(prompts: list[Any], seeds: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """Renders and object masks of every (prompt, seed), seeds 0..seeds-1."""
    from dagfusion.nodes.shapes.render import render_batch

    images, masks, captions, seed_of = [], [], [], []
    for seed in range(seeds):
        rendered = render_batch(prompts, 64, seed=1000 + seed, first_index=0)
        images.append(rendered.image)
        masks.append(rendered.mask)
        captions += [s.caption for s in prompts]
        seed_of += [seed] * len(prompts)
    return torch.cat(images), torch.cat(masks), captions, seed_of


def sample(model_for: Any, clip: Any, vae: Any, captions: list[str], seeds: list[int], steps: int) -> tuple[torch.Tensor, float]:
    """Images of each caption (``model_for(i)`` samples row ``i`` with its seed) and the seconds per image."""
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample as run
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import decode

    start = time.perf_counter()
    out = []
    for i, (caption, seed) in enumerate(zip(captions, seeds)):
        cond = encode_prompt(clip, caption, "")
        model = model_for(i)
        result = run(model, cond, empty_latent(model, 64, 64), steps=steps, guidance_scale=4.0, seed=seed)
        out.append(decode(vae, result))
    return torch.cat(out), (time.perf_counter() - start) / len(captions)


def misread_labels(evaluator: Any, images: torch.Tensor, captions: list[str]) -> list[str]:
    """For each image, what ShapeEval misreads (``"attribute=read"``, comma-separated), or ``""``."""
    from dagfusion.nodes.metrics.evaluator import misread

    return [", ".join(f"{k}={v}" for k, v in wrong.items()) for wrong in misread(evaluator, images, captions)]


def write_failures(path: Path, renders: torch.Tensor, unguided: torch.Tensor, guided: torch.Tensor,
                   unguided_misread: list[str], guided_misread: list[str], limit: int = 24) -> int:
    """A PNG contact sheet of the images ShapeEval misreads in either variant (at most ``limit``):
    three tiles each (two to a row) of the render, the unguided image and the ControlNet's, labelled
    with what was misread. Returns how many images' tiles it shows."""
    from dagfusion.nodes.diffusion.images import to_pil
    from dagfusion.nodes.everyday.grid import contact_sheet

    shown = [i for i, (u, g) in enumerate(zip(unguided_misread, guided_misread)) if u or g][:limit]
    if not shown:
        return 0
    tiles, labels = [], []
    for i in shown:
        tiles += [renders[i], unguided[i], guided[i]]
        labels += [f"#{i}", f"unguided: {unguided_misread[i] or 'ok'}", f"ControlNet: {guided_misread[i] or 'ok'}"]
    big = torch.nn.functional.interpolate(torch.stack(tiles), scale_factor=2, mode="nearest")
    to_pil(contact_sheet(big, labels, columns=6)[0]).save(path)
    return len(shown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlnet", required=True, help="the shapes ControlNet (single safetensors file)")
    parser.add_argument("--prompts", type=int, default=96,
                        help="how many prompts of the split, spread evenly (the default: every held-out combination)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--strength", type=float, default=1.0, help="the ControlNet's conditioning scale")
    parser.add_argument("--end", type=float, default=1.0, help="the fraction of the run the ControlNet acts on")
    parser.add_argument("--guess-mode", action="store_true",
                        help="run the ControlNet on the conditional half only, with logspace scales")
    parser.add_argument("--split", choices=("eval", "train"), default="eval",
                        help="prompts from the held-out combinations (the measurement) or the training ones "
                             "(for choosing settings)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings are reported with one)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--failures", help="also write a PNG of the images ShapeEval misreads (render, unguided, ControlNet)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.metrics.intervals import paired_difference
    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.structure.controlnet import ControlNetPatch
    from dagfusion.nodes.structure.controlnet_model import load_controlnet
    from dagfusion.nodes.structure.metrics import mask_iou

    loaded = load_diffusers_folder(folder("shapes-sd"))
    controlnet = load_controlnet(Path(args.controlnet))
    evaluator = load_shapeeval(SHIPPED)
    prompts = held_out_prompts(args.prompts, args.split)
    renders, masks, captions, seeds = ground_truth(prompts, args.seeds)

    vae = loaded.vae.module
    with torch.no_grad():
        latents = vae.encode(renders * 2 - 1).latent_dist.mode()
        round_trip = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    shifted = torch.roll(renders, shifts=1, dims=-1)

    unguided, unguided_seconds = sample(lambda i: loaded.model, loaded.clip, loaded.vae, captions, seeds, args.steps)

    def guided_model(i: int) -> Any:
        return loaded.model.with_patch(ControlNetPatch(controlnet, masks[i:i + 1], strength=args.strength, end=args.end,
                                                          guess_mode=args.guess_mode))

    guided, guided_seconds = sample(guided_model, loaded.clip, loaded.vae, captions, seeds, args.steps)

    def iou(images: torch.Tensor) -> float:
        return statistics.fmean(mask_iou(images, masks))

    ceiling = iou(round_trip)
    result = {
        "prompts": args.prompts, "split": args.split, "seeds": args.seeds, "steps": args.steps, "images": len(captions),
        "iou": {"unguided": iou(unguided), "controlnet": iou(guided), "vae_round_trip_ceiling": ceiling,
                "render_shifted_1px": iou(shifted), "render": iou(renders)},
        "shapeeval": {"unguided": score(evaluator, unguided, captions),
                      "controlnet": score(evaluator, guided, captions),
                      "render": score(evaluator, renders, captions),
                      "vae_round_trip": score(evaluator, round_trip, captions)},
        "controlnet_settings": {"strength": args.strength, "end": args.end, "guess_mode": args.guess_mode},
        "threads": args.threads,
        "seconds_per_image": {"unguided": unguided_seconds, "controlnet": guided_seconds},
    }
    result["controlnet_iou_over_ceiling"] = result["iou"]["controlnet"] / ceiling
    guided_misread = misread_labels(evaluator, guided, captions)
    unguided_misread = misread_labels(evaluator, unguided, captions)
    difference = paired_difference([float(not m) for m in guided_misread], [float(not m) for m in unguided_misread])
    result["controlnet_minus_unguided_all_correct"] = list(difference)
    if args.failures:
        result["failures_shown"] = write_failures(Path(args.failures), renders, unguided, guided, unguided_misread,
                                                guided_misread)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
