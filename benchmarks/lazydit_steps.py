"""LazyDiT on shapes-dit: quality of trained gate files at several skipping levels, against the uncached run.

For each gate file (trained by ``workflows/lazydit_shapes.yaml``; per-step or step-independent
gates) and each skipping setting, on the held-out prompts of the shapes world with the same
seeds as the uncached run (25 steps, guidance 4 by default):

- **MAC speedup**: multiply-accumulates of the uncached run / the lazy run (counted over the
  whole run with :func:`dagfusion.model.count_macs`);
- **skipped**: the fraction of attention/MLP module evaluations reused (the run report);
- **PSNR / SSIM** of the final images against the uncached ones (PSNR: mean over images);
- **ShapeEval** all-correct of the lazy images (and of the uncached ones, in the header).

Settings: ``threshold:X`` (skip where the lazy score is above ``X``; 0.5 is the paper's) and
``laziness:L`` (skip about a fraction ``L`` of the modules per step), each optionally followed by
``:R``, the ``max_reuse`` (a module reuses its output at most ``R`` steps in a row; 0: no limit). Everything printed is
measured in this one process, with one torch thread.

Usage::

    python benchmarks/lazydit_steps.py --gates A=out/lazydit_gates.safetensors \\
        --settings threshold:0.5 laziness:0.2 laziness:0.3 --limit 32 --json out.json
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

from shapes_models import batch_conditioning  # noqa: E402


def parse_setting(text: str) -> dict[str, Any]:
    """``"threshold:0.5"`` / ``"laziness:0.3"`` (optionally ``":R"``, the ``max_reuse``) -> the
    LazyGates settings (``start_step`` 1).

    :raises ValueError: another rule name or a value that is not a number.
    """
    rule, _, rest = text.partition(":")
    value, _, reuse = rest.partition(":")
    if rule not in ("threshold", "laziness"):
        raise ValueError(f"a setting is threshold:X or laziness:L (then :R for max_reuse R), got {text!r}")
    return {"rule": rule, rule: float(value), "start_step": 1, "max_reuse": int(reuse or 0)}


def parse_gates(text: str) -> tuple[str, str]:
    """``"label=path"`` (or a bare path, labelled by its parent folder) -> ``(label, path)``."""
    label, sep, path = text.partition("=")
    return (label, path) if sep else (Path(text).parent.name or text, text)


def run(loaded: Any, model: Any, prompts: list[str], steps: int, guidance: float) -> tuple[Any, int, dict[str, Any]]:
    """Images for ``prompts`` with ``model`` (maybe patched), the MACs it computed and its run report's patches."""
    from dagfusion.model import count_macs
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.diffusion.vae import decode

    cond = batch_conditioning(loaded.clip, prompts)
    with torch.no_grad(), count_macs(model.denoiser, records=False) as counter:
        latents, report = run_sampling(model, cond, empty_latent(model, 64, 64, len(prompts)), steps=steps,
                                       guidance_scale=guidance, seed=0)
    return decode(loaded.vae, latents), counter.total, dict(report.patches)


def measure(images: Any, reference: Any, prompts: list[str], evaluator: Any) -> dict[str, float]:
    """PSNR (mean of the finite per-image values), SSIM and ShapeEval all-correct of ``images``."""
    from dagfusion.nodes.metrics.evaluator import score
    from dagfusion.nodes.metrics.fidelity import psnr, ssim

    finite = [v for v in psnr(images, reference).tolist() if math.isfinite(v)]
    return {
        "psnr": round(sum(finite) / len(finite), 2) if finite else float("inf"),
        "ssim": round(float(ssim(images, reference).mean()), 4),
        "shapeeval": round(score(evaluator, images, prompts)["all_correct"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.cache.lazydit import KEY_PREFIX, LazyGates
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval, score
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.shapes.models import folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gates", nargs="+", required=True, help="gate files, as label=path or path")
    parser.add_argument("--settings", nargs="+", default=["threshold:0.5", "laziness:0.1", "laziness:0.2", "laziness:0.3"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--limit", type=int, default=0, help="use only this many held-out prompts (0: all 96)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    evaluator = load_shapeeval(SHIPPED)
    prompts = ShapesDataset(split="eval").prompts()
    if args.limit:
        prompts = prompts[:: max(1, len(prompts) // args.limit)][: args.limit]
    loaded = load_diffusers_folder(folder("shapes-dit"), dtype="fp32", device="cpu", source="embedded:shapes-dit")
    reference, full_macs, _ = run(loaded, loaded.model, prompts, args.steps, args.guidance)
    base = score(evaluator, reference, prompts)["all_correct"]
    print(f"# LazyDiT on shapes-dit: {len(prompts)} held-out prompts, {args.steps} steps, guidance {args.guidance}, "
          f"same seeds; uncached ShapeEval all-correct {base:.3f}")
    print("| gates | setting | MAC speedup | skipped | PSNR dB | SSIM | ShapeEval |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for label, path in map(parse_gates, args.gates):
        arch, gates = LazyGates.read(path)
        for text in args.settings:
            patch = LazyGates(gates, arch, **parse_setting(text))
            images, macs, patches = run(loaded, loaded.model.with_patch(patch), prompts, args.steps, args.guidance)
            stats = next(v for k, v in patches.items() if k.startswith(KEY_PREFIX))
            row = {"gates": label, "gate_steps": patch.steps, "setting": text,
                   "mac_ratio": round(full_macs / max(macs, 1), 3), "skipped": round(stats["skip_fraction"], 4),
                   "skipped_per_step": [round(c["skipped"] / c["total"], 3) if c["total"] else 0.0 for c in stats["steps"]],
                   **measure(images, reference, prompts, evaluator)}
            rows.append(row)
            print(f"| {label} ({patch.steps} step{'s' if patch.steps > 1 else ''}) | {text} | {row['mac_ratio']:.2f}x | "
                  f"{row['skipped']:.1%} | {row['psnr']} | {row['ssim']:.4f} | {row['shapeeval']:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"uncached_shapeeval": base, "prompts": len(prompts), "rows": rows},
                                              indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
