"""Quality of weight quantization on the embedded shapes-sd model: uniform bits vs mixed precision.

Every variant samples the same held-out prompts of the shapes world with the same seeds as the
full-precision (fp32) run, 25 steps by default, and is scored by:

- **bits**: average bits per UNet parameter, counting every byte (codes, fp16 scales,
  zero-points, the 16-bit layers) — :func:`dagfusion.nodes.quant.patch.average_bits`;
- **PSNR / SSIM** of the final images against the fp32 images;
- **ShapeEval** all-correct of the images against their prompts.

Variants: uniform ``int8`` (per output channel) and ``int4``/``int3``/``int2`` with groups of
64 (``dagfusion.quant.WeightOnly``); mixed precision (``dagfusion.quant.MixedPrecision``) at
each ``--targets`` average and at the exact average of each uniform grouped format (the
like-for-like comparison). The mixed-precision sensitivity is measured once
(``dagfusion.quant.Sensitivity``'s functions) on *training-split* prompts, never the
evaluated ones: ``--calibration-prompts`` prompts, one seed, ``--calibration-steps`` of the
``--steps`` recorded, candidate widths ``--bits``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/quant_quality.py                   # 24 prompts x 1 seed
    python benchmarks/quant_quality.py --prompts 96 --seeds 2 --json out.json
    python benchmarks/quant_quality.py --sensitivity sens.json              # measure once, reuse
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes_models import batch_conditioning  # noqa: E402


def spread(items: list[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``items`` (all when ``count`` is 0 or more than there are)."""
    if not count or count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def generate(loaded: Any, model: Any, prompts: list[str], seeds: int, steps: int, guidance: float) -> Any:
    """Images (seeds · N, 3, 64, 64) for ``prompts`` with ``model`` (a handle, maybe patched);
    seed ``s`` samples the whole batch with seed ``s``."""
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode

    cond = batch_conditioning(loaded.clip, prompts)
    images = []
    with torch.no_grad():
        for seed in range(seeds):
            latents = sample(model, cond, empty_latent(model, 64, 64, len(prompts)), steps=steps,
                             guidance_scale=guidance, seed=seed)
            images.append(decode(loaded.vae, latents))
    return torch.cat(images)


def sensitivity_of(loaded: Any, args: argparse.Namespace) -> Any:
    """The mixed-precision sensitivity of shapes-sd (read from ``--sensitivity`` if that file exists)."""
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.quant.mixed import load_sensitivity, measure_sensitivity, parse_bits, record_calls, save_sensitivity
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    if args.sensitivity and Path(args.sensitivity).is_file():
        print(f"# sensitivity read from {args.sensitivity}")
        return load_sensitivity(args.sensitivity)
    prompts = spread(ShapesDataset(split="train").prompts(), args.calibration_prompts)
    cond = batch_conditioning(loaded.clip, prompts)
    latent = empty_latent(loaded.model, 64, 64, len(prompts))
    start = time.perf_counter()
    calls = record_calls(loaded.model, cond, latent, steps=args.steps, count=args.calibration_steps,
                         guidance_scale=args.guidance, seed=12345)
    done = [0]

    def progress(i: int, total: int) -> None:
        if i % 16 == 0 or i == total:
            print(f"#   sensitivity: {i}/{total} layers, {time.perf_counter() - start:.0f} s", flush=True)
        done[0] = i

    sens = measure_sensitivity(loaded.model.denoiser, calls, bits=parse_bits(args.bits), group_size=args.group_size,
                               calibration={"prompts": prompts, "steps": args.steps, "guidance_scale": args.guidance,
                                            "seed": 12345, "recorded_steps": [c.step for c in calls]},
                               progress=progress)
    print(f"# sensitivity: {len(sens.layers)} layers x {len(sens.bits)} widths on {len(prompts)} training prompts x "
          f"{len(calls)} steps ({sum(c.rows for c in calls)} rows) in {time.perf_counter() - start:.0f} s")
    if args.sensitivity:
        save_sensitivity(sens, args.sensitivity)
    return sens


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.quant.mixed import allocate, quantize_allocation, spec_for_bits
    from dagfusion.nodes.quant.patch import average_bits, quantize_module
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.metrics.fidelity import psnr, ssim
    from dagfusion.nodes.shapes.models import folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts, spread over the 96 (0: all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--targets", type=float, nargs="+", default=[4.0, 3.0, 2.0], help="mixed-precision average bits")
    parser.add_argument("--bits", default="1,2,3,4,8", help="candidate widths of the mixed precision")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calibration-prompts", type=int, default=4, help="training-split prompts of the calibration run")
    parser.add_argument("--calibration-steps", type=int, default=4, help="steps of the calibration run recorded")
    parser.add_argument("--sensitivity", help="JSON file: read the sensitivity from it if it exists, else write it")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    evaluator = load_shapeeval(SHIPPED)
    prompts = spread(ShapesDataset(split="eval").prompts(), args.prompts)
    labels = prompts * args.seeds
    loaded = load_diffusers_folder(folder("shapes-sd"), dtype="fp32", device="cpu", source="embedded:shapes-sd")
    unet = loaded.model.denoiser
    print(f"# shapes-sd weight quantization on {len(prompts)} held-out prompts x {args.seeds} seed(s), {args.steps} steps, "
          f"guidance {args.guidance}; PSNR/SSIM against fp32 with the same seeds; torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    reference = generate(loaded, loaded.model, prompts, args.seeds, args.steps, args.guidance)
    base = score(evaluator, reference, labels)["all_correct"]
    print(f"# fp32 sampled in {time.perf_counter() - start:.0f} s", flush=True)

    sens = sensitivity_of(loaded, args)
    variants: list[tuple[str, Any]] = []
    uniform_bits: dict[str, float] = {}
    for name in ("int8", "int4", "int3", "int2"):
        spec = spec_for_bits(int(name[3:]), args.group_size)
        patch = quantize_module(unet, spec)
        uniform_bits[name] = average_bits(unet, patch)
        variants.append((f"uniform {name}" + (f" g{args.group_size}" if spec.group_size else " per channel"), patch))
    targets = [(f"mixed {t:g}", t) for t in args.targets]
    targets += [(f"mixed = {name} bits", uniform_bits[name]) for name in ("int4", "int3", "int2")]
    for label, target in targets:
        try:
            allocation = allocate(unet, sens, target)
        except ValueError as error:
            print(f"# {label}: {error}")
            continue
        variants.append((label, quantize_allocation(unet, sens, allocation)))

    from dagfusion.nodes.metrics.frechet import frechet_distance

    with torch.no_grad():
        reference_features = evaluator.embed(reference)
    fp16_bytes = 2 * sum(p.numel() for p in unet.parameters())
    rows = [{"variant": "fp32", "bits": 32.0, "size_ratio": 0.5, "psnr": math.inf, "ssim": 1.0, "shapeeval": round(base, 4),
             "fd": 0.0, "histogram": ""}]
    for label, patch in variants:
        start = time.perf_counter()
        images = generate(loaded, loaded.model.with_patch(patch), prompts, args.seeds, args.steps, args.guidance)
        p = [v for v in psnr(images, reference).tolist() if math.isfinite(v)]
        counts: dict[int, int] = {}
        for qt in patch.layers.values():
            counts[qt.spec.bits] = counts.get(qt.spec.bits, 0) + qt.numel
        quantized = sum(counts.values())
        histogram = " ".join(f"{b}b:{100 * n / quantized:.0f}%" for b, n in sorted(counts.items())) if len(counts) > 1 else ""
        rows.append({
            "variant": label,
            "bits": round(average_bits(unet, patch), 4),
            "size_ratio": round(fp16_bytes / patch.nbytes, 2),
            "psnr": round(sum(p) / len(p), 2) if p else math.inf,
            "ssim": round(float(ssim(images, reference).mean()), 4),
            "shapeeval": round(score(evaluator, images, labels)["all_correct"], 4),
            "fd": round(float(frechet_distance(evaluator.embed(images).detach(), reference_features)), 3),
            "histogram": histogram,
        })
        print(f"# {label}: sampled in {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\n## shapes-sd (fp32 ShapeEval all-correct {base:.3f})")
    print("| variant | avg bits | fp16 size / size | PSNR dB vs fp32 | SSIM | ShapeEval all-correct | FD-shapes vs fp32 | quantized weights by width |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['bits']:.3f} | {r['size_ratio']:.2f}x | {r['psnr']} | {r['ssim']:.4f} | {r['shapeeval']:.3f} | "
              f"{r['fd']:.2f} | {r['histogram']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
