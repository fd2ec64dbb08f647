"""Layered Diffusion Brushes cost: a full generation vs a brush layer re-rendering from the cached base.

On the embedded ``shapes-sd`` model (64 × 64 pictures, 16 × 16 latents, 25 DDIM steps, guidance
4, one torch thread): the base generation is recorded once (``brush_base``), then timed are

- ``full``: a complete 25-step generation (``dagfusion.sampling.Sample``'s loop, ``sample``);
- ``layer_0.3`` / ``layer_0.6`` / ``layer_1.0``: one brush layer (``brush_layer``) over the left
  half with another prompt at strength 0.3 / 0.6 / 1.0, which re-renders the last 8 / 15 / 25 steps.

The variants alternate, each repeated ``--repeats`` times (after one warm-up round); medians and
the ratio layer / full are printed (and written with ``--json``), with the denoiser calls of each.

    python benchmarks/brushes_shapes.py [--repeats 3] [--steps 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.everyday.brushes import brush_base, brush_layer
    from dagfusion.nodes.everyday.inpaint import rectangle_mask, to_latent_size
    from dagfusion.nodes.shapes.models import folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    loaded = load_diffusers_folder(folder("shapes-sd"), dtype="fp32", device="cpu", source="embedded:shapes-sd")
    model = loaded.model
    base_prompt = encode_prompt(loaded.clip, "a large red circle in the center on a black background", "")
    edit_prompt = encode_prompt(loaded.clip, "a large blue square on the left on a black background", "")
    latent = empty_latent(model, 64, 64, 1)
    mask = to_latent_size(rectangle_mask(64, 64, 0, 0, 32, 64), 16, 16)
    state, _ = brush_base(model, base_prompt, latent, steps=args.steps, guidance_scale=args.guidance,
                                    seed=5)
    calls: dict[str, int] = {"full": args.steps}

    def full() -> None:
        sample(model, base_prompt, latent, steps=args.steps, guidance_scale=args.guidance, seed=5)

    def layer(strength: float) -> Any:
        def run() -> None:
            _, report = brush_layer(model, state, edit_prompt, mask, strength=strength, seed=11)
            calls[f"layer_{strength}"] = report["denoiser_calls"]
        return run

    variants = {"full": full, **{f"layer_{s}": layer(s) for s in (0.3, 0.6, 1.0)}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn()
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "model": "shapes-sd", "steps": args.steps, "guidance_scale": args.guidance, "repeats": args.repeats,
        "threads": 1, "device": "cpu",
        "variants": {name: {"median_seconds": medians[name], "ratio_to_full": medians[name] / medians["full"],
                            "denoiser_calls": calls[name]} for name in variants},
    }
    print(f"shapes-sd, {args.steps} steps, 64x64, CPU, 1 thread, median of {args.repeats}")
    for name, row in results["variants"].items():
        print(f"  {name:10s} {row['median_seconds'] * 1000:8.1f} ms  {row['denoiser_calls']:3d} denoiser calls  "
              f"ratio {row['ratio_to_full']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
