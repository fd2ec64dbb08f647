"""Speed at equal quality: every cache scheduler's knob swept, and its speedup read at one PSNR.

For each scheduler of an embedded shapes model, each knob value is measured on held-out prompts
against the uncached run with the same seeds (25 steps, guidance 4): the **counted MAC speedup**,
mean **PSNR** against the uncached images, and **ShapeEval** all-correct. The speedup *at the
target PSNR* is interpolated linearly between the two knob values whose PSNRs bracket it (the
target defaults to what DeepCache N=5 reaches on shapes-sd in the same run, and to 40 dB on
shapes-dit). "Fewer steps" (no cache, fewer sampling steps, compared with the 25-step run) is
the baseline every scheduler has to beat.

**CPU wall-clock** of each point is measured in the same process on a batch of ``--time-batch``
prompts, one torch thread: each of ``--repeats`` rounds times the variants in a fresh seeded
order, each between two uncached runs, and a variant's speedup is the median over the rounds of
the mean neighbouring uncached time over its own — a ratio on this machine's tiny models, not a
GPU figure (see ``benchmarks/cache_speed.py``).

Usage::

    python benchmarks/cache_equal_quality.py --model shapes-sd --json sd.json --plot-dir docs
    python benchmarks/cache_equal_quality.py --model shapes-dit --target 40 --json dit.json --plot-dir docs
    python benchmarks/cache_equal_quality.py --dry-run      # a tiny run of the whole script
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_quality import calibration

STEPS = 25
GUIDANCE = 4.0


class Variant:
    """One point of a scheduler's sweep: ``make(loaded)`` gives the model to sample ``steps`` steps with."""

    def __init__(self, scheduler: str, knob: str, make: Callable[[Any], Any], *, steps: int) -> None:
        self.scheduler, self.knob, self.make, self.steps = scheduler, knob, make, steps
        self.row: dict[str, Any] = {}


def cachequant(interval: int, steps: int, span: tuple[int, int] | None = None, *, full: int = 0) -> Callable[[Any], Any]:
    """CacheQuant calibrated as in ``cache_quality.py`` (8 training-split prompts, never the evaluated
    ones) with ``full`` full steps, or (``full`` 0) the full steps of a uniform ``interval``."""
    def make(loaded: Any) -> Any:
        from dagfusion.nodes.cache.cachequant import schedule_patch

        schedule = calibration(loaded, steps, GUIDANCE)(interval=interval, full=full, **({"span": span} if span else {}))
        return loaded.model.with_patch(schedule_patch(schedule))

    return make


def variants(model: str, steps: int, dry_run: bool = False) -> list[Variant]:
    """The sweeps of ``model``'s schedulers (uncached first)."""
    from dagfusion.nodes.cache.blockcache import BlockCacheConfig, BlockCachePatch
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch
    from dagfusion.nodes.cache.diffusers_caches import CacheSettings, DiffusersCachePatch

    out = [Variant("uncached", "", lambda loaded: loaded.model, steps=steps)]
    few = (4,) if dry_run else (20, 15, 12, 10, 8, 6, 5, 4)
    out += [Variant("fewer steps", str(s), lambda loaded: loaded.model, steps=s) for s in few if s < steps]
    intervals = (2, 3) if dry_run else (2, 3, 4, 5, 6, 7, 8)
    full_counts: set[int] = set()
    quant_intervals = []
    for n in intervals:
        if -(-steps // n) not in full_counts:
            full_counts.add(-(-steps // n))
            quant_intervals.append(n)
    if model == "shapes-sd":
        out += [Variant("DeepCache", f"N={n}", lambda loaded, n=n: loaded.model.with_patch(DeepCachePatch(DeepCacheConfig(interval=n))),
                        steps=steps) for n in intervals]
        out += [Variant("CacheQuant", f"K={-(-steps // n)}", cachequant(n, steps), steps=steps) for n in quant_intervals]
        return out
    # The cached span is a knob too: 1-7 leaves the first and the last block computing (the
    # schedulers' default), 1-8 only the first. CacheQuant's own knob, the number of full steps K,
    # takes every value from 13 to 5 (not only a uniform interval's).
    full_steps = [-(-steps // n) for n in quant_intervals] if dry_run else (13, 11, 9, 8, 7, 6, 5)
    for span in ((1, 7), (1, 8)):
        name = f"{span[0]}-{span[1]}"
        out += [Variant(f"BlockCache {name}", f"N={n}", lambda loaded, n=n, span=span: loaded.model.with_patch(
            BlockCachePatch(BlockCacheConfig(span=span, interval=n))), steps=steps) for n in intervals[:4]]
        out += [Variant(f"CacheQuant {name}", f"K={k}", cachequant(0, steps, span, full=k), steps=steps) for k in full_steps]
    thresholds = (0.1, 0.2) if dry_run else (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
    out += [Variant("FBC (diffusers)", f"{t:g}", lambda loaded, t=t: loaded.model.with_patch(
        DiffusersCachePatch(CacheSettings("first_block_cache", threshold=t))), steps=steps) for t in thresholds]
    out += [Variant("TaylorSeer (diffusers)", f"{n}", lambda loaded, n=n: loaded.model.with_patch(
        DiffusersCachePatch(CacheSettings("taylorseer", cache_interval=n, disable_cache_before_step=2))), steps=steps)
            for n in intervals[:4]]
    return out


def speedup_at(points: Sequence[dict[str, Any]], target: float) -> tuple[float | None, str]:
    """The MAC speedup at PSNR ``target`` on a scheduler's curve, and how it was read.

    Linear between the two points (ordered by speedup) whose PSNRs bracket the target — the
    fastest such pair; without a bracketing pair, the fastest point at or above the target
    ("not bracketed"); ``None`` when no point reaches it.
    """
    ordered = sorted(points, key=lambda p: p["mac_speedup"])
    best: tuple[float, str] | None = None
    for a, b in zip(ordered, ordered[1:]):
        if a["psnr"] >= target >= b["psnr"] and a["psnr"] > b["psnr"]:
            top = min(a["psnr"], 200.0)
            share = (top - target) / (top - b["psnr"])
            value = a["mac_speedup"] + share * (b["mac_speedup"] - a["mac_speedup"])
            if best is None or value > best[0]:
                best = (value, f"between {a['knob']} and {b['knob']}")
    if best is not None:
        return round(best[0], 3), best[1]
    reaching = [p for p in ordered if p["psnr"] >= target]
    if reaching:
        return reaching[-1]["mac_speedup"], f"{reaching[-1]['knob']} (not bracketed)"
    return None, "not reached"


def plot(rows: list[dict[str, Any]], key: str, label: str, target: float | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for scheduler in dict.fromkeys(r["scheduler"] for r in rows if r["scheduler"] != "uncached"):
        points = sorted((r for r in rows if r["scheduler"] == scheduler), key=lambda r: r["mac_speedup"])
        ax.plot([r["mac_speedup"] for r in points], [min(r[key], 70.0) for r in points], marker="o", label=scheduler)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.1f} dB")
    ax.set_xlabel("MAC speedup over the uncached 25-step run (counted)")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.tune.measure import generate, mean_psnr, shapeeval_score

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-sd", choices=("shapes-sd", "shapes-dit"))
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts (default all 96)")
    parser.add_argument("--target", type=float, default=0.0, help="PSNR (dB) to read speedups at (default: DeepCache N=5's on shapes-sd, 40 on shapes-dit)")
    parser.add_argument("--time-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--plot-dir")
    parser.add_argument("--dry-run", action="store_true", help="a tiny run: 4 prompts, 6 steps, two knobs per scheduler")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = 6 if args.dry_run else STEPS
    count = 4 if args.dry_run else args.prompts
    loaded = load_diffusers_folder(folder(args.model), dtype="fp32", device="cpu", source=f"embedded:{args.model}")
    evaluator = load_shapeeval(SHIPPED)
    prompts = ShapesDataset(split="eval").prompts()
    prompts = prompts[:: max(1, len(prompts) // count)][:count]
    timing = prompts[: min(args.time_batch, len(prompts))]

    def run(model: Any, n: int, which: Sequence[str]) -> tuple[Any, int]:
        return generate(model, loaded.clip, loaded.vae, which, steps=n, guidance=GUIDANCE, seed=0, resolution=64,
                        batch_size=len(which))

    reference, full_macs = run(loaded.model, steps, prompts)
    base_score = shapeeval_score(evaluator, reference, prompts)
    sweep = variants(args.model, steps, args.dry_run)
    models: list[Any] = []
    for variant in sweep:
        model = variant.make(loaded)
        models.append(model)
        images, macs = run(model, variant.steps, prompts)
        variant.row = {"scheduler": variant.scheduler, "knob": variant.knob, "mac_speedup": round(full_macs / max(macs, 1), 3),
                       "psnr": round(mean_psnr(images, reference), 2), "shapeeval": shapeeval_score(evaluator, images, prompts)}
        print(json.dumps(variant.row), flush=True)
    # Wall-clock: each round times every variant once, in a fresh seeded order, with the uncached
    # run timed right before and after each one; a variant's ratio is the mean of those two
    # uncached times over its own, and its figure the median over the rounds.
    ratios: list[list[float]] = [[] for _ in sweep]
    order = random.Random(0)

    def seconds_of(index: int) -> float:
        began = time.perf_counter()
        run(models[index], sweep[index].steps, timing)
        return time.perf_counter() - began

    for _ in range(args.repeats):
        indices = list(range(1, len(sweep)))
        order.shuffle(indices)
        before = seconds_of(0)
        for index in indices:
            taken = seconds_of(index)
            after = seconds_of(0)
            ratios[index].append((before + after) / 2 / taken)
            before = after
    rows = []
    for index, variant in enumerate(sweep):
        variant.row["cpu_wall_speedup"] = round(statistics.median(ratios[index]), 3) if index else 1.0
        rows.append(variant.row)
    target = args.target or next((r["psnr"] for r in rows if r["scheduler"] == "DeepCache" and r["knob"] == "N=5"),
                                 40.0 if args.model == "shapes-dit" else rows[-1]["psnr"])
    summary = []
    for scheduler in dict.fromkeys(r["scheduler"] for r in rows if r["scheduler"] != "uncached"):
        curve = [r for r in rows if r["scheduler"] == scheduler]
        speed, how = speedup_at(curve, target)
        wall, _ = speedup_at([{**r, "mac_speedup": r["cpu_wall_speedup"]} for r in curve], target)
        summary.append({"scheduler": scheduler, "mac_speedup_at_target": speed, "cpu_wall_speedup_at_target": wall, "read": how})
    result = {"model": args.model, "prompts": len(prompts), "steps": steps, "target_psnr": target,
              "uncached_shapeeval": base_score, "threads": torch.get_num_threads(), "rows": rows, "at_target": summary}
    print(f"\n## {args.model}: {len(prompts)} held-out prompts, {steps} steps; speedup at {target:.2f} dB PSNR vs the uncached run")
    print("| scheduler | MAC speedup at target | CPU wall-clock speedup at target | read |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['scheduler']} | {s['mac_speedup_at_target']} | {s['cpu_wall_speedup_at_target']} | {s['read']} |")
    print("\n| scheduler | knob | MAC speedup | CPU wall-clock speedup | PSNR dB | ShapeEval |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        score = "—" if r["shapeeval"] is None else f"{r['shapeeval']:.3f}"
        print(f"| {r['scheduler']} | {r['knob']} | {r['mac_speedup']:.2f}× | {r['cpu_wall_speedup']:.2f}× | {r['psnr']} | {score} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.plot_dir:
        out = Path(args.plot_dir)
        out.mkdir(parents=True, exist_ok=True)
        title = f"{args.model}: {len(prompts)} held-out prompts, {steps} steps (CPU-measured quality)"
        plot(rows, "psnr", "PSNR vs the uncached run (dB)", target, title, out / f"cache-speed-psnr-{args.model}.png")
        plot(rows, "shapeeval", "ShapeEval all-correct", None, title, out / f"cache-speed-shapeeval-{args.model}.png")
    return 0 if all(math.isfinite(r["mac_speedup"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
