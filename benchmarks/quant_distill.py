"""Quantization-aware distillation on the embedded shapes-sd model: quality before and after.

For each target of average bits: mixed precision (``dagfusion.quant.MixedPrecision``'s allocation
from the sensitivity of ``benchmarks/quant_quality.py``), then BitsFusion's two distillation
stages through the training loop (``dagfusion.quant.Trainable`` + ``dagfusion.quant.DistillLoss``:
stage I CFG-aware output distillation, stage II the v-prediction loss with timesteps weighted by
the measured error profile), then packed again (``dagfusion.quant.Freeze``). Quality on held-out
prompts against the fp32 model with the same seeds: PSNR, SSIM, ShapeEval all-correct.

Training runs on this CPU (fp32); the step counts are small next to the paper's.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/quant_distill.py --targets 2.0 2.5 --stage1 300 --stage2 100 \\
        --sensitivity sens.json
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

from quant_quality import generate, sensitivity_of, spread  # noqa: E402


def distill(loaded: Any, patch: Any, stage: str, steps: int, args: argparse.Namespace, weights: tuple[float, ...] = (),
            seed: int = 0) -> Any:
    """``patch`` (a QATPatch) trained ``steps`` steps with stage ``stage``; returns the trained patch."""
    from dagfusion.nodes.quant.distill import QuantDistillObjective
    from dagfusion.nodes.quant.qat import QATPatch
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.training.loop import TrainConfig, train

    objective = QuantDistillObjective(
        stage=stage, prediction="v_prediction", zero_terminal_snr=True, guidance_min=args.guidance_min,
        guidance_max=args.guidance_max, timestep_weights=weights,
    )
    config = TrainConfig(steps=steps, batch_size=args.batch_size, learning_rate=args.lr, schedule="cosine",
                         warmup_steps=min(20, steps // 10), weight_decay=0.0, caption_dropout=0.1, trainable="patches",
                         seed=seed)
    began = time.perf_counter()
    last = [0.0]

    def progress(step: int, total: int, values: dict[str, float]) -> None:
        if step % max(1, total // 5) == 0 or step == total:
            print(f"#   stage {stage}: step {step}/{total} loss {values['loss']:.5f} ({time.perf_counter() - began:.0f} s)",
                  flush=True)
        last[0] = values["loss"]

    data = ShapesDataset(split="train", objects=1, resolution=64, seed=0)
    result = train(loaded.model.without_patches().with_patch(patch), data, loaded.clip, loaded.vae, objective, config,
                   progress=progress)
    return next(p for p in result.model.patches if isinstance(p, QATPatch))


def error_weights(loaded: Any, packed: Any, bins: int) -> tuple[float, ...]:
    """The error profile of the packed model on 4 calibration prompts of the training split."""
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.quant.qat_nodes import measure_error_profile
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from shapes_models import batch_conditioning

    prompts = spread(ShapesDataset(split="train").prompts(), 4)
    weights, _ = measure_error_profile(
        loaded.model.with_patch(packed), batch_conditioning(loaded.clip, prompts),
        empty_latent(loaded.model, 64, 64, len(prompts)), bins=bins, steps=25, guidance_scale=4.0, seed=99,
    )
    return tuple(weights)


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.quant.mixed import allocate, quantize_allocation
    from dagfusion.nodes.quant.patch import average_bits
    from dagfusion.nodes.quant.qat import QATPatch, freeze
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.metrics.fidelity import psnr, ssim
    from dagfusion.nodes.shapes.models import folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 2.5])
    parser.add_argument("--stage1", type=int, default=300, help="stage I steps")
    parser.add_argument("--stage2", type=int, default=100, help="stage II steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--guidance-min", type=float, default=2.0)
    parser.add_argument("--guidance-max", type=float, default=6.0)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--bits", default="1,2,3,4,8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calibration-prompts", type=int, default=4)
    parser.add_argument("--calibration-steps", type=int, default=4)
    parser.add_argument("--sensitivity", help="JSON file: read the sensitivity from it if it exists, else write it")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    loaded = load_diffusers_folder(folder("shapes-sd"), dtype="fp32", device="cpu", source="embedded:shapes-sd")
    evaluator = load_shapeeval(SHIPPED)
    prompts = spread(ShapesDataset(split="eval").prompts(), args.prompts)
    labels = prompts * args.seeds
    print(f"# shapes-sd distillation: {len(prompts)} held-out prompts x {args.seeds} seed(s), {args.steps} steps, guidance "
          f"{args.guidance}; stage I {args.stage1} + stage II {args.stage2} steps, batch {args.batch_size}, lr {args.lr}; "
          f"torch threads {torch.get_num_threads()}")
    reference = generate(loaded, loaded.model, prompts, args.seeds, args.steps, args.guidance)
    base = score(evaluator, reference, labels)["all_correct"]
    from dagfusion.nodes.metrics.frechet import frechet_distance

    with torch.no_grad():
        reference_features = evaluator.embed(reference)
    fp16_bytes = 2 * sum(p.numel() for p in loaded.model.denoiser.parameters())
    rows = [{"variant": "fp32", "bits": 32.0, "psnr": math.inf, "ssim": 1.0, "shapeeval": base}]
    sens = sensitivity_of(loaded, args)
    unet = loaded.model.denoiser

    def measure(label: str, patch: Any, bits: float, seconds: float = 0.0) -> None:
        images = generate(loaded, loaded.model.with_patch(patch), prompts, args.seeds, args.steps, args.guidance)
        values = [v for v in psnr(images, reference).tolist() if math.isfinite(v)]
        row = {"variant": label, "bits": round(bits, 3), "psnr": round(sum(values) / len(values), 2) if values else math.inf,
               "ssim": round(float(ssim(images, reference).mean()), 4),
               "shapeeval": round(score(evaluator, images, labels)["all_correct"], 3), "train_s": round(seconds),
               "size_ratio": round(fp16_bytes / patch.nbytes, 2),
               "fd": round(float(frechet_distance(evaluator.embed(images).detach(), reference_features)), 3)}
        rows.append(row)
        print(f"| {row['variant']} | {row['bits']:.3f} | {row['size_ratio']:.2f}x | {row['psnr']} | {row['ssim']:.4f} | "
              f"{row['shapeeval']:.3f} | {row['fd']:.2f} | {row['train_s']} |", flush=True)

    print("| variant | avg bits | fp16 size / size | PSNR dB vs fp32 | SSIM | ShapeEval all-correct | FD-shapes vs fp32 | CPU training s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| fp32 | 32 | 0.50x | — | 1.0000 | {base:.3f} | 0.00 | |", flush=True)
    for target in args.targets:
        packed = quantize_allocation(unet, sens, allocate(unet, sens, target))
        bits = average_bits(unet, packed)
        measure(f"mixed {target:g}", packed, bits)
        began = time.perf_counter()
        student = distill(loaded, QATPatch(packed, unet), "output", args.stage1, args)
        stage1 = freeze(student)
        measure(f"mixed {target:g} + stage I", stage1, average_bits(unet, stage1), time.perf_counter() - began)
        if args.stage2:
            weights = error_weights(loaded, stage1, args.bins)
            print("#   error profile (t bins low to high):", ", ".join(f"{w:.2f}" for w in weights), flush=True)
            student = distill(loaded, student, "noise", args.stage2, args, weights, seed=1)
            both = freeze(student)
            measure(f"mixed {target:g} + stages I+II", both, average_bits(unet, both), time.perf_counter() - began)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
