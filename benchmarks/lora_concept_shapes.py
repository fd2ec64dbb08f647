"""Did a LoRA teach shapes-sd a new colour? Pink prompts and ordinary prompts, with and without it.

Protocol, on the embedded ``shapes-sd`` model (64 × 64 pictures, CPU, one torch thread), for a
LoRA file trained by ``workflows/lora_concept_shapes.yaml`` (or any LoRA for shapes-sd):

- ``--prompts`` held-out pink prompts (the ``"eval"`` split of
  :func:`~dagfusion.nodes.shapes.concept.concept_scenes`: shape × position × size × background
  combinations of pink never trained on, spread evenly over the list) × ``--seeds`` seeds are
  sampled at ``--steps`` steps (25), guidance ``--guidance`` (4), with and without the LoRA
  (strength ``--strength``), from the same seeds (seed ``s``: the generator of ``s · 1000``);
- **pink**: the fraction of images whose object reads as pink with
  :mod:`~dagfusion.nodes.metrics.colour` (the mean RGB of the segmented object, nearest of the
  six world colours and pink). Because the shipped VAE was trained on the six world colours only,
  it cannot decode pink exactly (it draws pink renders' latents in a reddish tone); so the same
  fraction is also given against a *VAE-calibrated* palette — each colour's entry is the mean
  object RGB of VAE round trips (encode, decode) of its held-out renders — which asks whether the
  model generates what the VAE makes of pink. The round trips of the pink renders themselves give
  the ceiling of both;
- **attributes**: shape, position, size and background accuracy of the pink images read by the
  shipped ShapeEval (its colour head knows six colours only and is ignored), and the fraction of
  images with all four right;
- **nothing else broke**: ShapeEval all-correct (and per attribute) on ``--ordinary`` ordinary
  held-out prompts (the world's ``"eval"`` split, spread evenly) × the same seeds, with and
  without the LoRA.

    python benchmarks/lora_concept_shapes.py LORA.safetensors [--prompts 48] [--seeds 2] [--ordinary 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from typing import Any

import torch

PINK = "pink"
ATTRIBUTES = ("shape", "position", "size", "background")


def spread(items: list[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all of them when ``count`` is larger)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def batch_conditioning(clip: Any, prompts: list[str]) -> Any:
    """One conditioning holding every prompt's row (negative: the empty prompt)."""
    from dagfusion.nodes.diffusion.data import Conditioning
    from dagfusion.nodes.diffusion.text import encode_prompt

    rows = [encode_prompt(clip, p, "") for p in prompts]
    positive = {k: torch.cat([r.positive[k] for r in rows]) for k in rows[0].positive}
    negative = {k: torch.cat([r.negative[k] for r in rows]) for k in rows[0].negative} if rows[0].negative else None
    return Conditioning(rows[0].kind, positive, negative, {"prompts": prompts})


def generate(model: Any, clip: Any, vae: Any, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Images (N, 3, 64, 64) in [0, 1] for ``prompts``, one batch, seeded by ``seed · 1000``."""
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode

    cond = batch_conditioning(clip, prompts)
    out = sample(model, cond, empty_latent(model, 64, 64, len(prompts)), steps=steps, guidance_scale=guidance, seed=seed * 1000)
    return decode(vae, out)[:, :3].clamp(0, 1)


def round_trip(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """``images`` encoded (the latent distribution's mode) and decoded by ``vae``."""
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.vae import decode, encode

    return decode(vae, Latent(encode(vae, images, mode="mode").samples))[:, :3].clamp(0, 1)


def vae_palette(vae: Any, colour_renders: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """Each colour's mean object RGB over VAE round trips of its renders."""
    from dagfusion.nodes.metrics.colour import calibrated_palette

    trips = torch.cat([round_trip(vae, images) for images in colour_renders.values()])
    names = [name for name, images in colour_renders.items() for _ in range(images.shape[0])]
    return {k: tuple(round(v, 4) for v in rgb) for k, rgb in calibrated_palette(trips, names).items()}  # type: ignore[misc]


def pink_metrics(images: torch.Tensor, scenes: list[Any], evaluator: Any, calibrated: dict[str, Any]) -> dict[str, Any]:
    """Colour reading (true and VAE-calibrated palettes) and ShapeEval's non-colour attributes."""
    from dagfusion.nodes.metrics.colour import NONE, nearest_colour, object_rgb
    from dagfusion.nodes.metrics.evaluator import predict

    rgb, found = object_rgb(images)
    strict = nearest_colour(rgb)
    tuned = nearest_colour(rgb, calibrated)
    predicted = predict(evaluator, images)
    expected = [s.labels() for s in scenes]
    n = len(scenes)
    result: dict[str, Any] = {
        "pink": sum(c == PINK for c in strict) / n,
        "pink_vae_calibrated": sum(c == PINK for c in tuned) / n,
        "object_found": sum(found) / n,
        "colours": dict(Counter(strict).most_common()),
        "colours_vae_calibrated": dict(Counter(tuned).most_common()),
        "mean_object_rgb": [round(float(v), 4) for v in rgb[torch.tensor(found, dtype=torch.bool)].mean(dim=0)]
        if any(found) else None,
    }
    for name in ATTRIBUTES:
        result[name] = sum(p[name] == e[name] for p, e in zip(predicted, expected)) / n
    result["attributes_all_correct"] = sum(all(p[k] == e[k] for k in ATTRIBUTES) for p, e in zip(predicted, expected)) / n
    result["pink_and_attributes_correct"] = sum(
        c == PINK and all(p[k] == e[k] for k in ATTRIBUTES) for c, p, e in zip(tuned, predicted, expected)
    ) / n
    assert NONE not in calibrated
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.lora import attach, layouts
    from dagfusion.nodes.metrics.colour import nearest_colour, object_rgb, palette
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.shapes.concept import concept_dataset, concept_scenes
    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.shapes.render import render_batch
    from dagfusion.nodes.shapes.world import COLOURS, scenes

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lora", help="the LoRA .safetensors file (lora/pink-lora.safetensors of the workflow's run)")
    parser.add_argument("--prompts", type=int, default=48, help="held-out pink prompts (at most the split's 50)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--ordinary", type=int, default=48, help="ordinary held-out prompts")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    start = time.perf_counter()
    loaded = load_diffusers_folder(folder("shapes-sd"), dtype="fp32", device="cpu", source="embedded:shapes-sd")
    lora = layouts.load(args.lora)
    logger = logging.getLogger("benchmark")
    variants = {
        "plain": (loaded.model, loaded.clip),
        "lora": (attach.on_model(loaded.model, lora, args.strength, False, logger),
                 attach.on_clip(loaded.clip, lora, args.strength, False, logger)),
    }
    evaluator = load_shapeeval(SHIPPED)

    pink_scenes = spread(concept_scenes(PINK, "eval"), args.prompts)
    pink_prompts = [s.caption for s in pink_scenes]
    ordinary_scenes = spread(scenes("eval", 1), args.ordinary)
    ordinary_prompts = [s.caption for s in ordinary_scenes]

    # the palette as the VAE draws it: round trips of held-out renders of every colour
    pink_renders = concept_dataset(PINK, split="eval", resolution=64).batch(0, 48).images
    world = [s for s in scenes("eval", 1)]
    colour_renders = {
        name: render_batch([s for s in world if s.objects[0].colour == name][:24], 64, seed=7, first_index=0).image[:, :3]
        for name in COLOURS
    }
    colour_renders[PINK] = pink_renders
    calibrated = vae_palette(loaded.vae, colour_renders)
    trip = round_trip(loaded.vae, pink_renders)
    rgb, _ = object_rgb(trip)
    ceiling = {
        "renders_pink": sum(c == PINK for c in nearest_colour(object_rgb(pink_renders)[0])) / len(pink_renders),
        "vae_round_trip_pink": sum(c == PINK for c in nearest_colour(rgb)) / len(trip),
        "vae_round_trip_pink_vae_calibrated": sum(c == PINK for c in nearest_colour(rgb, calibrated)) / len(trip),
        "vae_round_trip_mean_rgb": list(calibrated[PINK]),
    }

    results: dict[str, Any] = {
        "model": "shapes-sd", "lora": args.lora, "strength": args.strength, "steps": args.steps,
        "guidance": args.guidance, "seeds": args.seeds, "pink_prompts": len(pink_prompts),
        "ordinary_prompts": len(ordinary_prompts), "threads": torch.get_num_threads(),
        "palette": {k: list(v) for k, v in palette().items()},
        "palette_vae_calibrated": {k: list(v) for k, v in calibrated.items()},
        "ceiling": ceiling,
    }
    for name, (model, clip) in variants.items():
        t0 = time.perf_counter()
        pink_images = torch.cat([generate(model, clip, loaded.vae, pink_prompts, args.steps, args.guidance, s)
                                 for s in range(args.seeds)])
        ordinary_images = torch.cat([generate(model, clip, loaded.vae, ordinary_prompts, args.steps, args.guidance, s)
                                     for s in range(args.seeds)])
        results[name] = {
            "pink_prompts": pink_metrics(pink_images, pink_scenes * args.seeds, evaluator, calibrated),
            "ordinary_prompts": score(evaluator, ordinary_images, ordinary_prompts * args.seeds),
            "seconds": time.perf_counter() - t0,
        }
    results["seconds"] = time.perf_counter() - start

    print(f"# shapes-sd with and without {args.lora} (strength {args.strength}), {args.steps} steps, guidance "
          f"{args.guidance}, {len(pink_prompts)} held-out pink prompts and {len(ordinary_prompts)} ordinary held-out "
          f"prompts x {args.seeds} seeds, CPU, {torch.get_num_threads()} thread")
    print(f"ceiling (pink renders through the VAE): pink {ceiling['vae_round_trip_pink']:.3f}, "
          f"VAE-calibrated {ceiling['vae_round_trip_pink_vae_calibrated']:.3f}")
    head = ("variant", "pink", "pink (VAE-cal.)", "shape", "position", "size", "background", "4 attrs", "ordinary all-correct")
    print(" | ".join(head))
    for name in variants:
        p, o = results[name]["pink_prompts"], results[name]["ordinary_prompts"]
        row = [name, p["pink"], p["pink_vae_calibrated"], *(p[k] for k in ATTRIBUTES), p["attributes_all_correct"], o["all_correct"]]
        print(" | ".join(str(v) if isinstance(v, str) else f"{v:.3f}" for v in row))
        print(f"  {name} pink-prompt colours: {p['colours']}; VAE-calibrated: {p['colours_vae_calibrated']}; "
              f"mean object RGB {p['mean_object_rgb']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
