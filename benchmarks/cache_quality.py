"""Quality of cache schedulers on the embedded shapes models, against the uncached run.

For each scheduler setting, on the held-out prompts of the shapes world with the same seeds as
the uncached run (25 steps by default):

- **MAC ratio**: multiply-accumulates the denoiser computed uncached / cached, counted
  (:func:`dagfusion.model.count_macs`) over the whole run — the compute speedup;
- **PSNR / SSIM** of the final images against the uncached images;
- **ShapeEval** all-correct of the cached images and of the uncached ones (against the prompts);
- **FD-shapes** of the cached images against the uncached ones.

Wall-clock on this CPU with 6 M-parameter models is not a speedup figure (see
``benchmarks/cache_speed.py`` for real-size architectures on a GPU); only MAC ratios are.

Usage::

    python benchmarks/cache_quality.py                       # both models
    python benchmarks/cache_quality.py --models shapes-sd --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes_models import batch_conditioning  # noqa: E402


def calibration(loaded: Any, steps: int, guidance: float, count: int = 8) -> Callable[..., Any]:
    """``schedule(**options)``: a CacheQuant schedule calibrated on ``count`` *training-split* prompts
    (never the evaluated ones), one seed, the benchmark's step count and guidance."""
    from dagfusion.nodes.cache.cachequant import calibrate
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    train = ShapesDataset(split="train").prompts()
    prompts = train[:: max(1, len(train) // count)][:count]
    cond = batch_conditioning(loaded.clip, prompts)

    def schedule(**options: Any) -> Any:
        with torch.no_grad():
            return calibrate(loaded.model, cond, empty_latent(loaded.model, 64, 64, len(prompts)), steps=steps,
                             guidance_scale=guidance, seed=123, **options)

    return schedule


def lazydit_variants(path: str | None) -> list[tuple[str, Any]]:
    """LazyDiT with the gates trained into ``path`` (none without a file): the paper's rule (skip
    where the gate's score passes a threshold) at thresholds 0.5 and 0.8 with at most one reuse in
    a row (the shipped workflow's setting) and without a limit, then a few target laziness values."""
    if not path:
        return []
    from dagfusion.nodes.cache.lazydit import LazyGates

    arch, gates = LazyGates.read(path)
    by_threshold = [
        (f"LazyDiT threshold {threshold:g}, {'max_reuse 1' if reuse else 'no reuse limit'} (trained gates)",
         LazyGates(gates, arch, rule="threshold", threshold=threshold, start_step=1, max_reuse=reuse))
        for threshold, reuse in ((0.5, 1), (0.8, 1), (0.5, 0))
    ]
    return by_threshold + [(f"LazyDiT laziness {lazy:g} (trained gates)",
                            LazyGates(gates, arch, rule="laziness", laziness=lazy, start_step=1))
                           for lazy in (0.1, 0.2, 0.3, 0.5)]


def variants(name: str, steps: int, loaded: Any = None, guidance: float = 4.0, gates: str | None = None
             ) -> list[tuple[str, Any]]:
    """``(label, patch)`` pairs to measure for embedded model ``name`` at ``steps`` steps (``None``:
    uncached; the non-uniform DeepCache schedule centres on 30 % of the steps, as 15 of 50 in the paper).
    CacheQuant schedules are calibrated on ``loaded`` (skipped when it is ``None``)."""
    from dagfusion.nodes.cache.blockcache import BlockCacheConfig, BlockCachePatch
    from dagfusion.nodes.cache.cachequant import schedule_patch
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch
    from dagfusion.nodes.cache.diffusers_caches import CacheSettings, DiffusersCachePatch

    calibrated = calibration(loaded, steps, guidance) if loaded is not None else None
    if name == "shapes-sd":
        out: list[tuple[str, Any]] = [("uncached", None)]
        for interval in (2, 3, 4, 5):
            out.append((f"DeepCache N={interval}", DeepCachePatch(DeepCacheConfig(interval=interval))))
        if calibrated is not None:
            for interval in (3, 5):
                schedule = calibrated(interval=interval, strength=1.0)  # "+ DEC": the fit as calibrated
                out.append((f"CacheQuant DPS K={len(schedule.full_steps)}, no correction", schedule_patch(schedule, correct=False)))
                out.append((f"CacheQuant DPS K={len(schedule.full_steps)} + DEC", schedule_patch(schedule)))
            schedule = calibrated(interval=5, objective="corrected", strength=1.0)
            out.append((f"CacheQuant DPS (corrected objective) K={len(schedule.full_steps)} + DEC", schedule_patch(schedule)))
        out.append(("DeepCache non-uniform N=3", DeepCachePatch(DeepCacheConfig(interval=3, schedule="non-uniform", center=int(0.3 * steps)))))
        out.append(("DeepCache N=3 branch 1", DeepCachePatch(DeepCacheConfig(interval=3, branch=1))))
        out.append(("PAB (diffusers) 2/6", DiffusersCachePatch(CacheSettings("pyramid_attention_broadcast"))))
        return out
    out = [("uncached", None)]
    for interval in (2, 3):
        out.append((f"BlockCache N={interval} blocks 1-7", BlockCachePatch(BlockCacheConfig(span=(1, 7), interval=interval))))
    out.append(("BlockCache N=3, Δ-DiT: blocks 4-8 then 0-4 from step 10", BlockCachePatch(BlockCacheConfig(span=(4, 8), late_span=(0, 4), boundary=10, interval=3))))
    if calibrated is not None:
        for interval in (2, 3):
            schedule = calibrated(interval=interval, span=(1, 7))
            out.append((f"CacheQuant DPS K={len(schedule.full_steps)} blocks 1-7, no correction", schedule_patch(schedule, correct=False)))
            out.append((f"CacheQuant DPS K={len(schedule.full_steps)} blocks 1-7 + DEC", schedule_patch(schedule)))
    out.extend(lazydit_variants(gates))
    for threshold in (0.05, 0.1, 0.2):
        out.append((f"FBC (diffusers) {threshold}", DiffusersCachePatch(CacheSettings("first_block_cache", threshold=threshold))))
    out.append(("PAB (diffusers) 2/6", DiffusersCachePatch(CacheSettings("pyramid_attention_broadcast"))))
    out.append(("PAB (diffusers) 3/6", DiffusersCachePatch(CacheSettings("pyramid_attention_broadcast", spatial_attention_block_skip_range=3))))
    for interval in (2, 3):
        out.append((f"TaylorSeer (diffusers) {interval}", DiffusersCachePatch(CacheSettings("taylorseer", cache_interval=interval, disable_cache_before_step=2))))
    return out


def run(loaded: Any, model: Any, prompts: list[str], steps: int, guidance: float) -> tuple[Any, int]:
    """Images for ``prompts`` with ``model`` (a handle, maybe patched) and the MACs it computed."""
    from dagfusion.model import count_macs
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode

    cond = batch_conditioning(loaded.clip, prompts)
    with torch.no_grad(), count_macs(model.denoiser, records=False) as counter:
        latents = sample(model, cond, empty_latent(model, 64, 64, len(prompts)), steps=steps, guidance_scale=guidance, seed=0)
    return decode(loaded.vae, latents), counter.total


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.metrics.fidelity import psnr, ssim
    from dagfusion.nodes.metrics.frechet import frechet_distance
    from dagfusion.nodes.shapes.models import EMBEDDED, folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["shapes-sd", "shapes-dit"], choices=list(EMBEDDED))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--limit", type=int, default=0, help="use only this many held-out prompts (0: all 96)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--only", help="measure only schedulers whose label matches this regular expression")
    parser.add_argument("--lazydit-gates", help="shapes-dit: LazyDiT gates trained by workflows/lazydit_shapes.yaml")
    args = parser.parse_args(argv)

    evaluator = load_shapeeval(SHIPPED)
    prompts = ShapesDataset(split="eval").prompts()
    if args.limit:
        prompts = prompts[:: max(1, len(prompts) // args.limit)][: args.limit]
    print(f"# cache schedulers on {len(prompts)} held-out prompts, {args.steps} steps, guidance {args.guidance}, "
          "same seeds; quality vs the uncached run of the same model")
    results: dict[str, Any] = {}
    for name in args.models:
        loaded = load_diffusers_folder(folder(name), dtype="fp32", device="cpu", source=f"embedded:{name}")
        reference, full_macs = run(loaded, loaded.model, prompts, args.steps, args.guidance)
        with torch.no_grad():
            reference_features = evaluator.embed(reference)
        base_score = score(evaluator, reference, prompts)["all_correct"]
        rows = []
        for label, patch in variants(name, args.steps, loaded, args.guidance, args.lazydit_gates):
            if args.only and patch is not None and not re.search(args.only, label):
                continue
            model = loaded.model if patch is None else loaded.model.with_patch(patch)
            images, macs = (reference, full_macs) if patch is None else run(loaded, model, prompts, args.steps, args.guidance)
            p = psnr(images, reference)
            finite = [v for v in p.tolist() if math.isfinite(v)]
            with torch.no_grad():
                fd = frechet_distance(evaluator.embed(images), reference_features) if patch is not None else 0.0
            rows.append({
                "scheduler": label, "mac_ratio": round(full_macs / max(macs, 1), 3),
                "psnr": round(sum(finite) / len(finite), 2) if finite else float("inf"),
                "ssim": round(float(ssim(images, reference).mean()), 4),
                "shapeeval": round(score(evaluator, images, prompts)["all_correct"], 4),
                "fd_vs_uncached": round(fd, 3),
            })
        results[name] = {"uncached_shapeeval": base_score, "rows": rows}
        print(f"\n## {name} (uncached ShapeEval all-correct {base_score:.3f})")
        print("| scheduler | MAC speedup | PSNR dB | SSIM | ShapeEval | FD-shapes vs uncached |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['scheduler']} | {r['mac_ratio']:.2f}x | {r['psnr']} | {r['ssim']:.4f} | {r['shapeeval']:.3f} | {r['fd_vs_uncached']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
