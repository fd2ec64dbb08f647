"""Caching and weight quantization together on shapes-sd (CacheQuant's joint setting).

For each weight quantization (uniform int8 per channel; mixed precision at a target of average
bits) the quantized model is sampled alone, with DeepCache's uniform schedule, with a CacheQuant
schedule calibrated on the *quantized* model (dynamic-programming full steps + cache-error
correction), and with the same schedule calibrated against the full-precision model as well
(the quantization error of the cached feature corrected too, after the cache error). Reported
together: the MAC speedup (counted), average bits and the compression against fp16, and quality
against the fp32 uncached run with the same seeds (PSNR, SSIM, ShapeEval all-correct).

Calibration uses 8 prompts of the training split; the evaluation uses held-out prompts. Wall-clock
numbers belong to ``benchmarks/cache_speed.py`` and ``benchmarks/quant_speed.py`` on a GPU.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/cache_quant_joint.py --sensitivity sens.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_quality import sensitivity_of, spread  # noqa: E402
from shapes_models import batch_conditioning  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from dagfusion.model import count_macs
    from dagfusion.nodes.cache.cachequant import calibrate, schedule_patch
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode
    from dagfusion.nodes.quant.mixed import allocate, quantize_allocation
    from dagfusion.nodes.quant.patch import average_bits, quantize_module
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.metrics.fidelity import psnr, ssim
    from dagfusion.nodes.shapes.models import folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--interval", type=int, default=5, help="DeepCache's interval; CacheQuant gets the same MACs")
    parser.add_argument("--mixed-bits", type=float, default=3.0)
    parser.add_argument("--bits", default="1,2,3,4,8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calibration-prompts", type=int, default=4, help="sensitivity calibration prompts")
    parser.add_argument("--calibration-steps", type=int, default=4)
    parser.add_argument("--sensitivity", help="JSON file: read the sensitivity from it if it exists, else write it")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    loaded = load_diffusers_folder(folder("shapes-sd"), dtype="fp32", device="cpu", source="embedded:shapes-sd")
    evaluator = load_shapeeval(SHIPPED)
    prompts = spread(ShapesDataset(split="eval").prompts(), args.prompts)
    cond = batch_conditioning(loaded.clip, prompts)
    train = ShapesDataset(split="train").prompts()
    calibration_prompts = spread(train, 8)
    calibration = batch_conditioning(loaded.clip, calibration_prompts)
    unet = loaded.model.denoiser

    def images(model: Any) -> tuple[Any, int]:
        with torch.no_grad(), count_macs(unet, records=False) as counter:
            latents = sample(model, cond, empty_latent(model, 64, 64, len(prompts)), steps=args.steps,
                             guidance_scale=args.guidance, seed=0)
        return decode(loaded.vae, latents), counter.total

    def schedule(model: Any, reference: Any = None) -> Any:
        with torch.no_grad():
            return calibrate(model, calibration, empty_latent(model, 64, 64, len(calibration_prompts)), steps=args.steps,
                             interval=args.interval, guidance_scale=args.guidance, seed=123, reference=reference,
                             strength=1.0)  # the cache-error fit as calibrated (off by default on UNets)

    print(f"# shapes-sd, caching + weight quantization: {len(prompts)} held-out prompts, {args.steps} steps, guidance "
          f"{args.guidance}; quality vs the fp32 uncached run with the same seeds; torch threads {torch.get_num_threads()}")
    reference, full_macs = images(loaded.model)
    base = score(evaluator, reference, prompts)["all_correct"]
    quantizations: list[tuple[str, Any]] = [("fp32", None), ("int8", quantize_module(unet, "int8"))]
    sens = sensitivity_of(loaded, args)
    quantizations.append((f"mixed {args.mixed_bits:g}", quantize_allocation(unet, sens, allocate(unet, sens, args.mixed_bits))))
    rows = []
    print("| weights | avg bits | compression vs fp16 | cache | MAC speedup | PSNR dB | SSIM | ShapeEval |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| fp32 | 32 | — | none | 1.00x | — | 1.0000 | {base:.3f} |", flush=True)
    for label, patch in quantizations:
        model = loaded.model if patch is None else loaded.model.with_patch(patch)
        bits = 32.0 if patch is None else average_bits(unet, patch)
        variants: list[tuple[str, Any]] = [] if patch is None else [("none", None)]
        variants.append((f"DeepCache N={args.interval}", DeepCachePatch(DeepCacheConfig(interval=args.interval))))
        variants.append(("CacheQuant DPS + cache DEC", schedule_patch(schedule(model))))
        if patch is not None:
            variants.append(("CacheQuant DPS + cache & quant DEC", schedule_patch(schedule(model, loaded.model))))
        for cache_label, cache in variants:
            out, macs = images(model if cache is None else model.with_patch(cache))
            values = [v for v in psnr(out, reference).tolist() if math.isfinite(v)]
            row = {"weights": label, "bits": round(bits, 3), "compression": round(16 / bits, 2) if patch is not None else None,
                   "cache": cache_label, "mac_speedup": round(full_macs / max(macs, 1), 3),
                   "psnr": round(sum(values) / len(values), 2) if values else math.inf,
                   "ssim": round(float(ssim(out, reference).mean()), 4),
                   "shapeeval": round(score(evaluator, out, prompts)["all_correct"], 3)}
            rows.append(row)
            compression = f"{row['compression']:.2f}x" if row["compression"] else "—"
            print(f"| {label} | {row['bits']:.3f} | {compression} | {cache_label} | {row['mac_speedup']:.2f}x | "
                  f"{row['psnr']} | {row['ssim']:.4f} | {row['shapeeval']:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "fp32_shapeeval": base, "rows": rows}, indent=1),
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
