"""The structure-guided refiner against the joint model's own image, on held-out two-object prompts (CPU).

The two stages of latent structural diffusion: the **joint** model (``workflows/train_structure_shapes.yaml``)
samples an image with its depth and normals from a caption and the layout ``LayoutFromPrompt`` draws
from it; the **refiner** (``workflows/train_structure_refiner.yaml``: a ControlNet on a two-object
fine-tune of shapes-sd) then generates the final image from the caption, that predicted depth and
those normals, and the layout (``StructureCondition``'s channels). For ``--prompts`` held-out
two-object captions (the evaluation split, spread evenly) × ``--seeds`` seeds, in one process:

- the two-object evaluator (ShapeEval-pair) on every image: relation, object count, both objects'
  colour and shape, **all-correct**, for the joint model's RGB output, the refiner's image and the
  refiner's base without the ControlNet (the same seeds);
- the refiner's all-correct minus the joint model's, with a paired-bootstrap 95 % interval over
  images (target: ≥ 0);
- how well each image keeps the caption's layout: the box IoU of its objects (segmented against
  the plain background) with the layout's boxes, as ``MaskIoU`` scores a layout;
- CPU seconds per image of each stage (batched sampling, ``--threads``).

``--conditions`` chooses what the refiner is given (any of depth, normal, layout; the others are
zeros, which the refiner was trained with as dropped conditions).

Usage::

    python benchmarks/structure_refiner.py --joint OUT/shapes-structural --base OUT/shapes-sd-two-objects \\
        --refiner OUT/shapes-refiner.safetensors [--prompts 96] [--seeds 4] [--json out.json]

The joint model samples with the base folder's text encoder and VAE (both stages train with the
same fine-tuned structure VAE and shapes-sd's text encoder).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from structure_joint import RESOLUTION, held_out_captions, per_image  # noqa: E402 - the two benchmarks score alike

__all__ = ["CONDITIONS", "RESOLUTION", "held_out_captions", "layout_iou", "main", "per_image", "run_stages"]
CONDITIONS = ("depth", "normal", "layout")


def parse_conditions(text: str) -> tuple[str, ...]:
    """The refiner's conditions from ``"depth, normal, layout"`` (any non-empty subset).

    :raises ValueError: an unknown name, or none.
    """
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown or not names:
        raise ValueError(f"expected a non-empty subset of {CONDITIONS}, got {text!r}")
    return names


class Timer:
    """Seconds spent per stage, summed over batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, began: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - began


def sample_plain(model: Any, conditioning: Any, vae: Any, rows: int, seed: int, steps: int, guidance: float) -> torch.Tensor:
    """Images of an SD-layout model (patched or not): ``rows`` latents from ``seed``, decoded."""
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode

    latent = empty_latent(model, RESOLUTION, RESOLUTION, rows)
    return decode(vae, sample(model, conditioning, latent, steps=steps, guidance_scale=guidance, seed=seed)).float().cpu()


def run_stages(joint: Any, base: Any, refiner: Any, captions: list[str], seeds: int, *, conditions: tuple[str, ...],
               steps: int, guidance: float, batch: int, strength: float, with_base: bool) -> tuple[dict[str, torch.Tensor], Timer]:
    """The joint model's image, depth and normals, the refiner's image and (``with_base``) the
    base's, for every (seed, caption) in that order; each batch shares one noise seed across the
    three models."""
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.structure.controlnet import ControlNetPatch
    from dagfusion.nodes.structure.layout import render_structure
    from dagfusion.nodes.structure.refiner import structure_condition
    from dagfusion.nodes.structure.structural import sample_structural

    images: dict[str, list[torch.Tensor]] = {"joint": [], "refiner": [], "base": [], "depth": [], "normal": []}
    timer = Timer()
    for seed in range(seeds):
        for start in range(0, len(captions), batch):
            chunk = captions[start:start + batch]
            noise_seed = 1000 * seed + start
            cond = encode_prompt(base.clip, chunk, "")
            layout = render_structure(chunk, RESOLUTION, "solid")["layout"]
            began = time.perf_counter()
            made = sample_structural(None, joint, cond, base.vae, width=RESOLUTION, height=RESOLUTION, seed=noise_seed,
                                     steps=steps, guidance_scale=guidance, layout=layout)
            timer.add("joint", began)
            images["joint"].append(made["image"].float().cpu())
            images["depth"].append(made["depth"].float().cpu())
            images["normal"].append(made["normal"].float().cpu())
            began = time.perf_counter()
            given = {"depth": made["depth"], "normal": made["normal"], "layout": layout}
            control, _ = structure_condition(**{k: v for k, v in given.items() if k in conditions},
                                             layout_channels=refiner.conditioning_channels - 4)
            guided = base.model.with_patch(ControlNetPatch(refiner, control, strength=strength))
            images["refiner"].append(sample_plain(guided, cond, base.vae, len(chunk), noise_seed, steps, guidance))
            timer.add("refiner", began)
            if with_base:
                began = time.perf_counter()
                images["base"].append(sample_plain(base.model, cond, base.vae, len(chunk), noise_seed, steps, guidance))
                timer.add("base", began)
    return {k: torch.cat(v) for k, v in images.items() if v}, timer


def layout_iou(images: torch.Tensor, captions: list[str], seeds: int) -> float:
    """Mean over images of the matched box IoU between the objects segmented in each image and the
    caption's layout boxes (``MaskIoU`` with a layout: each object's box against its layout box,
    a missing or extra object counting 0)."""
    import dataclasses

    from dagfusion.nodes.structure.layout import render_structure
    from dagfusion.nodes.structure.metrics import mask_iou

    layout = render_structure(captions, RESOLUTION, "solid")["layout"]
    every = dataclasses.replace(layout, rows=layout.rows * seeds,
                                background=layout.background * seeds if layout.background else ())
    return statistics.fmean(mask_iou(images, every))


def write_picture(path: Path, images: dict[str, torch.Tensor], rows: int, scale: int = 3) -> None:
    """A PNG grid: one row per image, columns the joint model's image, its depth, its normals and
    the refiner's image (nearest-neighbour enlarged ``scale`` times)."""
    from PIL import Image

    columns = [images["joint"], images["depth"].expand(-1, 3, -1, -1), (images["normal"] + 1) / 2, images["refiner"]]
    grid = torch.cat([torch.cat([c[i] for c in columns], dim=-1) for i in range(min(rows, len(images["joint"])))], dim=-2)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joint", required=True, help="the joint model's folder (SaveStructural)")
    parser.add_argument("--base", required=True, help="the refiner's base: a diffusers folder (its text encoder and VAE serve both stages)")
    parser.add_argument("--refiner", required=True, help="the refiner ControlNet (a single .safetensors file or a diffusers folder)")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--strength", type=float, default=1.0, help="the refiner's conditioning scale")
    parser.add_argument("--conditions", default="depth, normal, layout", help="what the refiner is given")
    parser.add_argument("--no-base", action="store_true", help="skip the base model without the refiner")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--picture", help="also write a PNG: joint image, depth, normals, refined image of the first prompts")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= 1024 or not 1 <= args.seeds <= 16 or not 1 <= args.steps <= 200 or not 1 <= args.batch <= 256:
        parser.error("expected --prompts in 1..1024, --seeds in 1..16, --steps in 1..200 and --batch in 1..256")
    try:
        conditions = parse_conditions(args.conditions)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)

    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.metrics.pair_evaluator import SHIPPED, load_pair_evaluator
    from dagfusion.nodes.structure.controlnet_model import load_controlnet
    from dagfusion.nodes.structure.structural_io import load

    base = load_diffusers_folder(Path(args.base), source=f"benchmark:{args.base}")
    joint = load(Path(args.joint), dtype="fp32")
    refiner = load_controlnet(Path(args.refiner))
    evaluator = load_pair_evaluator(SHIPPED)
    captions = held_out_captions(args.prompts)
    all_captions = captions * args.seeds

    with torch.no_grad():
        images, timer = run_stages(joint, base, refiner, captions, args.seeds, conditions=conditions, steps=args.steps,
                                   guidance=args.guidance, batch=args.batch, strength=args.strength,
                                   with_base=not args.no_base)
    results: dict[str, Any] = {"prompts": args.prompts, "seeds": args.seeds, "steps": args.steps,
                               "guidance": args.guidance, "strength": args.strength, "conditions": list(conditions),
                               "images": len(all_captions)}
    if args.picture:
        write_picture(Path(args.picture), images, rows=min(6, args.prompts))
    scores = {}
    for name in ("joint", "refiner", "base"):
        if name not in images:
            continue
        made = images[name]
        scores[name] = per_image(evaluator, made, all_captions)
        results[name] = {k: statistics.fmean(v) for k, v in scores[name].items()}
        results[name]["layout_iou"] = layout_iou(made, captions, args.seeds)
        results[name]["seconds_per_image"] = timer.seconds[name] / len(all_captions)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    from dagfusion.nodes.metrics.intervals import paired_difference

    point, low, high = paired_difference(scores["refiner"]["all_correct"], scores["joint"]["all_correct"])
    results["all_correct_refiner_minus_joint"] = [point, low, high]
    print(f"all-correct, refiner - joint: {point:+.3f} [{low:+.3f}, {high:+.3f}] (target >= 0)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
