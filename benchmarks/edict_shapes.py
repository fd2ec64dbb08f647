"""EDICT vs plain DDIM inversion on shapes renders: reconstruction fidelity, cost and an edit check.

Protocol, on the embedded ``shapes-sd`` model (64 × 64 pictures, 16 × 16 latents, CPU, one torch
thread):

- ``--images`` held-out single-object scenes (``scenes("eval", 1)``, spread evenly over the list)
  are rendered at 64 px (``render_batch``, seed 7) and encoded with the VAE (the mode of the latent
  distribution);
- each method inverts the latents with the scene's caption (``--steps`` DDIM steps, 25 by default;
  guidance 1 and 3, the same negative-free conditioning in both directions) and regenerates from
  the inverted noise with the same caption: ``edict`` is :func:`~dagfusion.nodes.everyday.edict.edict_invert`
  / ``edict_generate`` (mixing parameter 0.93), ``ddim`` is plain DDIM inversion (η = 0, the noise
  taken at the less noisy latent: :func:`~dagfusion.nodes.everyday.edict.ddim_invert` /
  ``ddim_generate``) on the same schedule, coefficients and ``ᾱ`` floor (1e-4: the model's
  schedule has zero terminal SNR);
- reported per method and guidance: the PSNR of the reconstructed latents against the input
  latents (peak: the input latents' range, max − min, per image), the PSNR of the decoded
  reconstruction against the VAE's round trip of the render (decode(encode(render)): isolates the
  inversion from the VAE) and against the render itself, the largest absolute latent error, and
  seconds per image of inversion plus regeneration (wall and process CPU time, the whole batch
  at once, divided by the image count);
- edit check: regenerating from the same inverted noise with the caption's colour changed (the
  next colour in the palette's order) and reading it with the shipped ShapeEval: the fraction of
  edits read all-correct against the edited caption (``--strength`` below 1 inverts only the
  last part of the schedule, as for editing; the default 1 inverts all of it).

Means over images are printed (and written with ``--json``, which also has the per-image
values); the VAE round trip's own PSNR and ShapeEval reading give the ceiling.

    python benchmarks/edict_shapes.py [--images 16] [--steps 25] [--guidance 1 3] [--strength 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from typing import Any

import torch

METHODS = ("edict", "ddim")


def held_out_scenes(count: int) -> list[Any]:
    """``count`` held-out single-object scenes spread evenly over the evaluation list."""
    from dagfusion.nodes.shapes.world import scenes

    pool = scenes("eval", 1)
    step = len(pool) / count
    return [pool[int(i * step)] for i in range(count)]


def recoloured(scene: Any) -> Any:
    """``scene`` with its object's colour replaced by the next one in the palette's order."""
    from dagfusion.nodes.shapes.world import COLOURS

    colours = list(COLOURS)
    obj = scene.objects[0]
    colour = colours[(colours.index(obj.colour) + 1) % len(colours)]
    return dataclasses.replace(scene, objects=(dataclasses.replace(obj, colour=colour),))


def latent_psnr(out: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per-image PSNR (dB) of latents, the peak being the reference's range (max − min) per image."""
    ref = reference.double().flatten(1)
    mse = ((out.double().flatten(1) - ref) ** 2).mean(dim=1)
    peak = ref.max(dim=1).values - ref.min(dim=1).values
    return [float(10 * torch.log10(p**2 / m)) if m > 0 else math.inf for p, m in zip(peak, mse)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import decode, encode
    from dagfusion.nodes.everyday.edict import (
        DEFAULT_MIX,
        ddim_generate,
        ddim_invert,
        edict_generate,
        edict_invert,
    )
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.metrics.fidelity import psnr
    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.shapes.render import render_batch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    loaded = load_diffusers_folder(folder("shapes-sd"), dtype="fp32", device="cpu", source="embedded:shapes-sd")
    model, vae = loaded.model, loaded.vae
    evaluator = load_shapeeval(SHIPPED)
    scene_list = held_out_scenes(args.images)
    captions = [s.caption for s in scene_list]
    edits = [recoloured(s).caption for s in scene_list]
    renders = render_batch(scene_list, 64, seed=7, first_index=0).image[:, :3]
    latents = encode(vae, renders, mode="mode").samples
    round_trip = decode(vae, Latent(latents))
    conditioning = encode_prompt(loaded.clip, captions, "")
    edit_conditioning = encode_prompt(loaded.clip, edits, "")
    settings = {"steps": args.steps, "strength": args.strength}

    def run(method: str, guidance: float) -> dict[str, Any]:
        kw = {**settings, "guidance_scale": guidance}
        wall, cpu = time.perf_counter(), time.process_time()
        if method == "edict":
            x, y = edict_invert(model, conditioning, latents, mix=DEFAULT_MIX, **kw)
            out, _ = edict_generate(model, conditioning, x, y, mix=DEFAULT_MIX, **kw)
        else:
            noise = ddim_invert(model, conditioning, latents, **kw)
            out = ddim_generate(model, conditioning, noise, **kw)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if method == "edict":
            edited, _ = edict_generate(model, edit_conditioning, x, y, mix=DEFAULT_MIX, **kw)
        else:
            edited = ddim_generate(model, edit_conditioning, noise, **kw)
        images = decode(vae, Latent(out))
        edit_images = decode(vae, Latent(edited))
        per_image = {
            "latent_psnr_db": latent_psnr(out, latents),
            "psnr_vs_vae_round_trip_db": psnr(images, round_trip).tolist(),
            "psnr_vs_render_db": psnr(images, renders).tolist(),
            "max_abs_latent_error": (out - latents).abs().flatten(1).max(dim=1).values.tolist(),
        }
        return {
            **{name: _mean(values) for name, values in per_image.items()},
            "max_abs_latent_error": max(per_image["max_abs_latent_error"]),
            "seconds_per_image": wall / len(captions),
            "cpu_seconds_per_image": cpu / len(captions),
            "reconstruction_shapeeval_all_correct": score(evaluator, images, captions)["all_correct"],
            "edit_shapeeval_all_correct": score(evaluator, edit_images, edits)["all_correct"],
            "per_image": per_image,
        }

    results: dict[str, Any] = {
        "model": "shapes-sd", "images": len(captions), "steps": args.steps, "strength": args.strength,
        "mix": DEFAULT_MIX, "min_alpha_cumprod": 1e-4, "resolution": 64, "device": "cpu", "threads": 1,
        "captions": captions, "edit_captions": edits,
        "vae_round_trip": {
            "psnr_vs_render_db": _mean(psnr(round_trip, renders).tolist()),
            "shapeeval_all_correct": score(evaluator, round_trip, captions)["all_correct"],
        },
        "methods": {method: {} for method in METHODS},
    }
    for guidance in args.guidance:
        for method in METHODS:
            results["methods"][method][f"{guidance:g}"] = run(method, guidance)

    vae_row = results["vae_round_trip"]
    print(f"shapes-sd, {len(captions)} held-out renders, 64x64, {args.steps} steps, strength {args.strength:g}, "
          f"CPU, 1 thread")
    print(f"VAE round trip: {vae_row['psnr_vs_render_db']:.2f} dB vs render, ShapeEval all-correct "
          f"{vae_row['shapeeval_all_correct']:.3f}")
    print(f"{'method':6s} {'cfg':>4s} {'latent dB':>10s} {'vs VAE rt dB':>13s} {'vs render dB':>13s} "
          f"{'max |err|':>10s} {'s/image':>8s} {'cpu s/img':>9s} {'recon SE':>9s} {'edit SE':>8s}")
    for guidance in args.guidance:
        for method in METHODS:
            r = results["methods"][method][f"{guidance:g}"]
            print(f"{method:6s} {guidance:4g} {r['latent_psnr_db']:10.2f} {r['psnr_vs_vae_round_trip_db']:13.2f} "
                  f"{r['psnr_vs_render_db']:13.2f} {r['max_abs_latent_error']:10.2e} {r['seconds_per_image']:8.2f} "
                  f"{r['cpu_seconds_per_image']:9.2f} {r['reconstruction_shapeeval_all_correct']:9.3f} "
                  f"{r['edit_shapeeval_all_correct']:8.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
