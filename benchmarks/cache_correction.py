"""Does CacheQuant's decoupled error correction (DEC) help? PSNR with and without it, on held-out prompts.

For each model and number of full steps ``K``, CacheQuant is calibrated on *training-split*
prompts (:func:`cache_quality.calibration`: evenly spaced over the training split, seed 123)
and evaluated on *held-out* prompts (the eval split, seed 0, as ``cache_quality.py``): the PSNR
of the final images against the uncached run of the same model, the same seeds, with the
correction off, and on for each calibration variant:

- ``default``: what ``calibrate`` gives without validation (the ``paper`` fit at the denoiser
  kind's default strength, :data:`~dagfusion.nodes.cache.cachequant.UNVALIDATED_STRENGTH`);
- ``paper``: one per-channel least-squares fit per reused step, on the uncached calibration run,
  over the whole guidance batch;
- ``per-condition``: separate fits for the unconditional and the conditional half of the batch;
- ``cached``: fitted on the cached run of the calibration prompts (``trajectory="cached"``);
- ``per-condition+cached``: both;
- ``validated``: the paper's fit plus the strength chosen on ``--validate`` more calibration
  prompts (held out from the fit, never the evaluation prompts; 0 = the correction off) by the
  PSNR of the decoded images against their uncached run.

Every variant but ``default`` and ``validated`` is measured at strength 1 (the fit as calibrated).

``--strengths`` also measures each variant's fit at fixed strengths (``(1 + λ(a − 1)) ⊙ f + λb``)
on the held-out prompts, to show the curve validation chooses from.

Usage::

    python benchmarks/cache_correction.py                                # shapes-sd K=5, shapes-dit K=9 and 13
    python benchmarks/cache_correction.py --runs shapes-sd:5 --heldout 96 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_quality import calibration, run

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {},
    "per-condition": {"per_condition": True},
    "cached": {"trajectory": "cached"},
    "per-condition+cached": {"per_condition": True, "trajectory": "cached"},
}
"""Calibration options of each variant (``default``: the paper's fit at the strength the calibration
gives without validation; ``validated`` is ``paper`` plus validation)."""

SPANS = {"shapes-dit": (1, 7)}
"""The cached block span per transformer model (as ``cache_quality.py``)."""


def mean_psnr(images: Any, reference: Any) -> float:
    """Mean PSNR (dB) over the images, leaving out identical ones (infinite PSNR)."""
    from dagfusion.nodes.metrics.fidelity import psnr

    finite = [v for v in psnr(images, reference).tolist() if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("inf")


def parse_run(text: str) -> tuple[str, int]:
    """``"shapes-sd:5"`` -> ``("shapes-sd", 5)``."""
    name, _, k = text.partition(":")
    return name, int(k)


def measure(loaded: Any, name: str, full: int, prompts: list[str], reference: Any, args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """Rows ``{variant, strength, full_steps, psnr_off, psnr_on, gain_db}`` for one model and ``K``."""
    from dagfusion.nodes.cache.cachequant import schedule_patch

    span = {"span": SPANS[name]} if name in SPANS else {}
    calibrated = calibration(loaded, args.steps, args.guidance, args.calibration)
    off_cache: dict[tuple[int, ...], float] = {}

    def psnr_of(schedule: Any, correct: bool) -> float:
        model = loaded.model.with_patch(schedule_patch(schedule, correct=correct))
        return mean_psnr(run(loaded, model, prompts, args.steps, args.guidance)[0], reference)

    def psnr_off(schedule: Any) -> float:
        if schedule.full_steps not in off_cache:
            off_cache[schedule.full_steps] = psnr_of(schedule, False)
        return off_cache[schedule.full_steps]

    rows = []
    for variant in args.variants:
        started = time.perf_counter()
        if variant == "validated":
            schedule = calibration(loaded, args.steps, args.guidance, args.calibration + args.validate)(
                full=full, validate=args.validate, vae=loaded.vae, **span)
        else:
            schedule = calibrated(full=full, **VARIANTS[variant], **span)
        fixed = variant in ("default", "validated")
        chosen = [schedule.strength] if fixed else sorted({1.0, *args.strengths})
        for strength in chosen:
            on = psnr_of(replace(schedule, strength=strength), True) if strength else psnr_off(schedule)
            off = psnr_off(schedule)
            rows.append({"variant": variant, "strength": strength, "full_steps": list(schedule.full_steps),
                         "psnr_off": round(off, 3), "psnr_on": round(on, 3), "gain_db": round(on - off, 3),
                         "validation": schedule.report.get("validation")})
        print(f"  {name} K={full} {variant}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.shapes.models import folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["shapes-sd:5", "shapes-dit:9", "shapes-dit:13"],
                        help="model:K pairs (K = number of full steps)")
    parser.add_argument("--variants", nargs="+", default=["default", "paper", "validated"], choices=[*VARIANTS, "validated"])
    parser.add_argument("--strengths", nargs="*", type=float, default=[],
                        help="also measure each variant's fit at these strengths (1 is always measured)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--calibration", type=int, default=8, help="training-split prompts the fit is calibrated on")
    parser.add_argument("--validate", type=int, default=4,
                        help="'validated': this many more training-split prompts choose the strength")
    parser.add_argument("--heldout", type=int, default=32, help="held-out (eval split) prompts, evenly spaced (0: all 96)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    prompts = ShapesDataset(split="eval").prompts()
    if args.heldout:
        prompts = prompts[:: max(1, len(prompts) // args.heldout)][: args.heldout]
    print(f"# CacheQuant correction on {len(prompts)} held-out prompts (seed 0), calibrated on {args.calibration} "
          f"training-split prompts (seed 123; 'validated': +{args.validate} to choose the strength); "
          f"{args.steps} steps, guidance {args.guidance}; PSNR vs the uncached run")
    results: dict[str, Any] = {"heldout": len(prompts), "calibration": args.calibration, "validate": args.validate,
                               "steps": args.steps, "guidance": args.guidance, "runs": {}}
    by_model: dict[str, list[int]] = {}
    for text in args.runs:
        name, full = parse_run(text)
        by_model.setdefault(name, []).append(full)
    print("| model | K | variant | strength | full steps | PSNR off dB | PSNR on dB | gain dB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fulls in by_model.items():
        loaded = load_diffusers_folder(folder(name), dtype="fp32", device="cpu", source=f"embedded:{name}")
        reference = run(loaded, loaded.model, prompts, args.steps, args.guidance)[0]
        for full in fulls:
            rows = measure(loaded, name, full, prompts, reference, args)
            results["runs"][f"{name}:{full}"] = rows
            for r in rows:
                print(f"| {name} | {full} | {r['variant']} | {r['strength']:g} | {' '.join(map(str, r['full_steps']))} "
                      f"| {r['psnr_off']:.2f} | {r['psnr_on']:.2f} | {r['gain_db']:+.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
