"""Activation quantization (DGQ) on the embedded shapes models: W8, W8A8, W4A8, and CacheQuant + W8A8.

For shapes-sd (UNet, CLIP text encoder) and shapes-dit (PixArt-layout transformer, T5 text
encoder), every variant samples the same held-out (eval-split) prompts with the same seed as the
full-precision fp32 run and is scored against it:

- **PSNR** dB of the final images against the fp32 images (mean over images);
- **ShapeEval** all-correct of the images against their prompts;
- **FD-shapes**: Fréchet distance between ShapeEval features of the images and of the fp32 images.

Variants (all fake-quantized in float32 on the CPU — the torch path; torchao's int8 kernels
run on CUDA only):

- ``W8``: int8 weights per output channel (``dagfusion.quant.WeightOnly``), activations fp32;
- ``W8A8 per-tensor``: W8 + 8-bit activations with one static range per layer input and
  uniform attention probabilities (the baseline);
- ``W8A8 DGQ``: W8 + DGQ as the paper sets it (:mod:`dagfusion.nodes.quant.activation`):
  outlier-aware groups (``--groups``) per layer input with the calibrated ranges, prompt-specific
  log quantization of the attention probabilities, the first token kept exact where calibration
  finds it peaks (``--start-token``);
- ``W8A8 DGQ groups, uniform attention, margin m``: the same groups, each range widened by
  ``m`` times its width, and the attention probabilities quantized uniformly (static range).
  ``--margin auto`` (the default) chooses ``m`` from 0, 0.1, 0.25 and 0.5 within the calibration
  prompts — ranges calibrated on their first half, each candidate scored against fp32 on their
  second half (a seed of its own) — never on the evaluated prompts; the choice and each
  candidate's PSNR are in the fp32 row's ``summary``;
- ``W4A8 …``: int4 weights in groups of ``--group-size`` with each of the two settings;
- ``…, N timestep intervals`` (``--intervals N``): each setting with DGQ's time-aware quantizer
  — the recorded steps split into N runs in sampling order, each with ranges of its own;
- ``… + CacheQuant``: a CacheQuant schedule (``--interval``'s MACs) calibrated on the W8A8 model
  (``--joint``: which setting) against the fp32 model (the joint setting), with its MAC speedup
  over the fp32 uncached run (counted with ``dagfusion.model.count_macs``).

Activation ranges are calibrated on ``--calibration-prompts`` training-split prompts (never the
evaluated ones) at ``--calibration-steps`` steps of one run with another seed. The keep list is
the default (first/last layers, embeddings, adaLN modulations keep full-precision inputs and
16-bit weights). ``compression`` is fp32 bytes over the stored bytes of the denoiser's weights.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/quant_activation.py                 # both models, 32 prompts
    python benchmarks/quant_activation.py --models shapes-sd --prompts 48 --json out.json
    python benchmarks/quant_activation.py --ablation --models shapes-sd     # which part of DGQ costs what
    python benchmarks/quant_activation.py --calibration-steps 20 --intervals 20 --interval 0   # + per-step ranges
    python benchmarks/quant_activation.py --dry-run                         # a tiny run of the whole script
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

from quant_quality import spread
from shapes_models import batch_conditioning

MODELS = ("shapes-sd", "shapes-dit")


def images_of(loaded: Any, model: Any, cond: Any, count: int, steps: int, guidance: float, seed: int,
              macs: bool = False) -> tuple[Any, int]:
    """Decoded images of one sampling run of ``model`` (a handle, maybe patched), and its MACs
    when ``macs`` (else 0)."""
    import contextlib

    from dagfusion.model import count_macs
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode

    counting = count_macs(loaded.model.denoiser, records=False) if macs else contextlib.nullcontext()
    with torch.no_grad(), counting as counter:
        latents = sample(model, cond, empty_latent(model, 64, 64, count), steps=steps, guidance_scale=guidance, seed=seed)
        out = decode(loaded.vae, latents)
    return out, (counter.total if macs else 0)


MARGINS = (0.0, 0.1, 0.25, 0.5)
"""The range margins ``--margin auto`` chooses from."""

SELECTION_SEED = 777
"""The noise seed of the runs that choose the margin (calibration prompts; the ranges are recorded
with seed 12345, the evaluated prompts sample with seed 0)."""


def finite_mean_psnr(images: Any, reference: Any) -> float:
    """Mean PSNR (dB, 2 decimals) of ``images`` against ``reference`` over the rows that differ;
    ``inf`` when every row is identical."""
    from dagfusion.nodes.metrics.fidelity import psnr

    values = [v for v in psnr(images, reference).tolist() if math.isfinite(v)]
    return round(sum(values) / len(values), 2) if values else math.inf


def choose_margin(loaded: Any, model: Any, calibration_prompts: list[str], args: argparse.Namespace,
                  **options: Any) -> tuple[float, dict[float, float]]:
    """The margin of :data:`MARGINS` that generalises best within the calibration prompts: ranges
    calibrated on their first half, each candidate's W8A8 model scored against fp32 (mean PSNR) on
    their second half, sampled with :data:`SELECTION_SEED`; and every candidate's PSNR. The
    evaluated prompts play no part (the final ranges are calibrated on all calibration prompts)."""
    from dagfusion.nodes.quant.activation import ActivationQuantPatch

    half = len(calibration_prompts) // 2
    if half < 1:
        raise ValueError("choosing the margin needs at least 2 calibration prompts")
    fit, check = calibration_prompts[:half], calibration_prompts[half:]
    fit_cond, check_cond = batch_conditioning(loaded.clip, fit), batch_conditioning(loaded.clip, check)
    reference, _ = images_of(loaded, loaded.model, check_cond, len(check), args.steps, args.guidance, SELECTION_SEED)
    calls = record_calibration(model, fit_cond, len(fit), args)
    scores = {}
    for margin in MARGINS:
        spec = activation_spec(model, fit_cond, len(fit), args, calls=calls, **{**options, "margin": margin})
        out, _ = images_of(loaded, model.with_patch(ActivationQuantPatch(spec)), check_cond, len(check), args.steps,
                           args.guidance, SELECTION_SEED)
        scores[margin] = finite_mean_psnr(out, reference)
    return max(MARGINS, key=lambda m: scores[m]), scores


def record_calibration(model: Any, calibration: Any, count: int, args: argparse.Namespace) -> Any:
    """The denoiser calls of one calibration run (``--calibration-steps`` steps, seed 12345)."""
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.quant.calibration import record_calls

    return record_calls(model, calibration, empty_latent(model, 64, 64, count), steps=args.steps,
                        count=args.calibration_steps, guidance_scale=args.guidance, seed=12345)


def activation_spec(model: Any, calibration: Any, count: int, args: argparse.Namespace, calls: Any = None,
                    **options: Any) -> Any:
    """The activation ranges of ``model`` (its weight quantization applied) from the calibration
    prompts (``calls``: a calibration run already recorded for ``model``)."""
    from dagfusion.model import apply_patches
    from dagfusion.nodes.quant.activation import calibrate_activations

    if calls is None:
        calls = record_calibration(model, calibration, count, args)
    module = model.denoiser
    with torch.no_grad(), model.use(module), apply_patches(model.patches, module):
        return calibrate_activations(module, calls, bits=args.abits, groups=args.groups, start_token=args.start_token,
                                     calibration={"prompts": count, "steps": args.steps, "seed": 12345}, **options)


def run_model(name: str, args: argparse.Namespace, evaluator: Any) -> list[dict[str, Any]]:
    from dagfusion.nodes.cache.cachequant import calibrate, schedule_patch
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.metrics.evaluator import score
    from dagfusion.nodes.metrics.frechet import frechet_distance
    from dagfusion.nodes.quant.activation import ActivationQuantPatch
    from dagfusion.nodes.quant.formats import QuantSpec
    from dagfusion.nodes.quant.patch import quantize_module, stored_bits
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    loaded = load(name)
    prompts = spread(ShapesDataset(split="eval").prompts(), args.prompts)
    calibration_prompts = spread(ShapesDataset(split="train").prompts(), args.calibration_prompts)
    cond = batch_conditioning(loaded.clip, prompts)
    calibration = batch_conditioning(loaded.clip, calibration_prompts)
    denoiser = loaded.model.denoiser
    fp32_bits = 32 * sum(p.numel() for p in denoiser.parameters())

    start = time.perf_counter()
    reference, full_macs = images_of(loaded, loaded.model, cond, len(prompts), args.steps, args.guidance, 0, macs=True)
    with torch.no_grad():
        reference_features = evaluator.embed(reference).detach()
    base = score(evaluator, reference, prompts)["all_correct"]
    print(f"# {name}: fp32 sampled in {time.perf_counter() - start:.0f} s", flush=True)
    rows = [{"model": name, "variant": "fp32", "compression": 1.0, "mac_speedup": 1.0, "psnr": math.inf,
             "shapeeval": round(base, 4), "fd": 0.0, "summary": {}}]

    w8 = quantize_module(denoiser, "int8")
    w4 = quantize_module(denoiser, QuantSpec.parse("int4", group_size=args.group_size))
    m8, m4 = loaded.model.with_patch(w8), loaded.model.with_patch(w4)
    variants: list[tuple[str, Any, Any, Any]] = [("W8", m8, w8, None)]
    paper = {"method": "dgq", "attention": "log", "margin": 0.0}
    margin, how = args.margin, "given"
    if margin is None:  # chosen on the calibration prompts, for the W8A8 groups with uniform attention
        margin, tried = choose_margin(loaded, m8, calibration_prompts, args, method="dgq", attention="uniform")
        how = ("chosen on the calibration prompts (ranges from the first half, PSNR on the second): "
               + ", ".join(f"{m:g} {p} dB" for m, p in tried.items()))
        print(f"# {name}: margin {margin:g} ({how})", flush=True)
    tuned = {"method": "dgq", "attention": "uniform", "margin": margin}
    rows[0]["summary"] = {"margin": margin, "margin_from": how}
    spec_pt = activation_spec(m8, calibration, len(calibration_prompts), args, method="per_tensor", attention="uniform")
    variants.append(("W8A8 per-tensor", m8.with_patch(ActivationQuantPatch(spec_pt)), w8, spec_pt))
    if args.ablation:  # which part of DGQ costs what, at W8A8
        variants = variants[1:]
        for label, options in (("W8A8 DGQ groups, uniform attention, margin 0", {**tuned, "margin": 0.0}),
                               (f"W8A8 DGQ groups, log attention, margin {margin:g}", {**paper, "margin": margin})):
            spec = activation_spec(m8, calibration, len(calibration_prompts), args, **options)
            variants.append((label, m8.with_patch(ActivationQuantPatch(spec)), w8, spec))
    weight_formats = () if args.ablation else (("W8", m8, w8),) if args.only_joint else (("W8", m8, w8), ("W4", m4, w4))
    for bits, model, weights in weight_formats:
        settings = [(f"{bits}A8 DGQ", paper), (f"{bits}A8 DGQ groups, uniform attention, margin {margin:g}", tuned)]
        if args.intervals > 1:  # DGQ's time-aware quantizer: ranges of their own per run of timesteps
            settings += [(f"{label}, {args.intervals} timestep intervals", {**options, "intervals": args.intervals})
                         for label, options in settings]
        for label, options in settings:
            spec = activation_spec(model, calibration, len(calibration_prompts), args, **options)
            variants.append((label, model.with_patch(ActivationQuantPatch(spec)), weights, spec))
    if args.interval > 1 and not args.ablation:
        joint_label, w8a8, _, joint_spec = variants[2 if args.joint == "paper" else 3]
        joint = [(joint_label, w8a8, joint_spec)]
        if args.only_joint:  # the joint rows only, with W8 + CacheQuant to tell caching's error from activations'
            variants, joint = [], [("W8", m8, None), *joint]
        for label, model, spec in joint:
            start = time.perf_counter()
            with torch.no_grad():
                schedule = calibrate(model, calibration, empty_latent(model, 64, 64, len(calibration_prompts)),
                                     steps=args.steps, interval=args.interval, guidance_scale=args.guidance, seed=123,
                                     reference=loaded.model)
            print(f"# {name}: CacheQuant schedule of {label} calibrated in {time.perf_counter() - start:.0f} s", flush=True)
            variants.append((f"{label} + CacheQuant (N={args.interval} MACs)", model.with_patch(schedule_patch(schedule)),
                             w8, spec))

    for label, model, weights, spec in variants:
        start = time.perf_counter()
        out, macs = images_of(loaded, model, cond, len(prompts), args.steps, args.guidance, 0, macs=True)
        with torch.no_grad():
            features = evaluator.embed(out).detach()
        rows.append({
            "model": name, "variant": label,
            "compression": round(fp32_bits / stored_bits(denoiser, weights)[0], 2),
            "mac_speedup": round(full_macs / max(macs, 1), 3),
            "psnr": finite_mean_psnr(out, reference),
            "shapeeval": round(score(evaluator, out, prompts)["all_correct"], 4),
            "fd": round(float(frechet_distance(features, reference_features)), 3),
            "summary": {} if spec is None else {k: v for k, v in spec.summary().items() if k in (
                "method", "groups", "attention", "quantized_inputs", "grouped_by", "attention_modules",
                "cross_attention_start_token_exact", "start_token_ratio", "timestep_intervals")},
        })
        print(f"# {name} {label}: sampled in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def load(name: str) -> Any:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.shapes.models import folder

    return load_diffusers_folder(folder(name), dtype="fp32", device="cpu", source=f"embedded:{name}")


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: shapes-sd, shapes-dit")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts, spread over the eval split")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--abits", type=int, default=8, help="activation bits")
    parser.add_argument("--groups", type=int, default=8, help="DGQ groups per layer input")
    parser.add_argument("--group-size", type=int, default=64, help="int4 weight group size")
    parser.add_argument("--calibration-prompts", type=int, default=8, help="training-split prompts for calibration")
    parser.add_argument("--calibration-steps", type=int, default=5, help="steps of the calibration run recorded")
    parser.add_argument("--interval", type=int, default=5, help="CacheQuant gets DeepCache's MACs at this interval (0: skip)")
    parser.add_argument("--margin", default="auto",
                        help="range margin of the second DGQ setting: a number, or 'auto' (default): the one of "
                             f"{', '.join(f'{m:g}' for m in MARGINS)} closest to fp32 on the calibration prompts")
    parser.add_argument("--intervals", type=int, default=1,
                        help="also the DGQ rows with ranges of their own per run of timesteps (DGQ's time-aware "
                             "quantizer), this many runs of the recorded steps (at most --calibration-steps)")
    parser.add_argument("--start-token", default="auto", choices=("auto", "on", "off"), help="log attention's start-token exception")
    parser.add_argument("--joint", default="groups", choices=("paper", "groups"),
                        help="the W8A8 DGQ setting combined with CacheQuant")
    parser.add_argument("--ablation", action="store_true",
                        help="instead: W8A8 per-tensor, DGQ groups with uniform attention and no margin, and DGQ groups "
                             "with log attention and the margin")
    parser.add_argument("--only-joint", action="store_true",
                        help="instead: W8 + CacheQuant and the W8A8 + CacheQuant joint setting only")
    parser.add_argument("--dry-run", action="store_true", help="a tiny run: 2 prompts, 4 steps, 2 calibration prompts")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    try:
        args.margin = None if args.margin == "auto" else float(args.margin)
    except ValueError:
        parser.error(f"--margin: expected a number or 'auto', got {args.margin!r}")
    if args.margin is not None and not 0.0 <= args.margin <= 4.0:
        parser.error("--margin: expected 0 to 4")
    if not 1 <= args.intervals <= args.calibration_steps:
        parser.error(f"--intervals: expected 1 to --calibration-steps ({args.calibration_steps}), got {args.intervals}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.dry_run:
        args.prompts, args.steps, args.calibration_prompts, args.calibration_steps = 2, 4, 2, 2
        args.intervals = min(args.intervals, 2)
        args.interval = min(args.interval, 2) if args.interval else 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected some of {list(MODELS)}")
    evaluator = load_shapeeval(SHIPPED)
    print(f"# activation quantization: {args.prompts} held-out prompts, {args.steps} steps, guidance {args.guidance}, "
          f"A{args.abits}, {args.groups} DGQ groups, calibration {args.calibration_prompts} training prompts x "
          f"{args.calibration_steps} steps; quality vs fp32 with the same seed; fake quantization on the CPU "
          f"(torch path); torch threads {torch.get_num_threads()}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in models:
        rows.extend(run_model(name, args, evaluator))
    print("\n| model | variant | weight compression vs fp32 | MAC speedup | PSNR dB vs fp32 | ShapeEval all-correct | FD-shapes vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['compression']:.2f}x | {r['mac_speedup']:.2f}x | {r['psnr']} | "
              f"{r['shapeeval']:.3f} | {r['fd']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
