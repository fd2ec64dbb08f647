"""A seed sweep of the quickstart on 2 Ray workers (1 thread each) vs the local executor (1 thread).

    python benchmarks/ray_sweep.py [--points 32] [--steps N] [--workers 2]

Both sides are warmed first (models loaded, torch started; on Ray: cluster started and each
worker warmed with a sweep of other seeds): those times are printed beside the measured ones,
not in them. Prints the speed ratio, whether every picture and report is identical, and how
many times each side loaded weights into its model cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def sweep_file(folder: Path, name: str, seeds: list[int]) -> Path:
    path = folder / f"{name}.yaml"
    text = (REPO / "workflows" / "quickstart.yaml").read_text(encoding="utf-8")
    path.write_text(text + f"sweep:\n  - {{sample.seed: {seeds}}}\n", encoding="utf-8")
    return path


def same(a: Path, b: Path, points: int) -> bool:
    for i in range(points):
        pa, pb = a / f"sweep-{i:03d}", b / f"sweep-{i:03d}"
        if (pa / "report.txt").read_bytes() != (pb / "report.txt").read_bytes():
            return False
        for png in pa.glob("*.png"):
            with Image.open(png) as x, Image.open(pb / png.name) as y:
                if not np.array_equal(np.asarray(x), np.asarray(y)):
                    return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the workflow's)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import ray

    from dagfusion import Engine, Settings
    from dagfusion.distributed import WorkerPool, run_sweep, worker_settings
    from dagfusion.distributed.cluster import local_init_options
    from dagfusion.model import default_cache

    work = Path(tempfile.mkdtemp(prefix="dagfusion-ray-bench-"))
    settings = Settings.load({"threads": 1, "device": "cpu", "output_dir": str(work / "outputs"),
                              "cache_dir": str(work / "cache")})
    overrides = [f"sample.steps={args.steps}"] if args.steps else []
    seeds = list(range(100, 100 + args.points))
    measured = sweep_file(work, "measured", seeds)
    warm = sweep_file(work, "warm", [1 + i for i in range(args.workers)])

    local = Engine(settings=settings)
    t = time.perf_counter()
    local.run_sweep(warm, overrides=overrides, out=work / "local-warm")
    local_warm = time.perf_counter() - t
    t = time.perf_counter()
    local.run_sweep(measured, overrides=overrides, out=work / "local")
    local_s = time.perf_counter() - t
    local_loads = default_cache().stats.loads

    t = time.perf_counter()
    ray.init(**local_init_options(num_cpus=args.workers, object_store_memory=200 * 1024**2))
    try:
        pool = WorkerPool(args.workers, worker_settings(settings))
        pool.info()
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        run_sweep(local, warm, pool, overrides=overrides, out=work / "ray-warm")
        ray_warm = time.perf_counter() - t
        t = time.perf_counter()
        outcome = run_sweep(local, measured, pool, overrides=overrides, out=work / "ray")
        ray_s = time.perf_counter() - t
        loads = pool.loads()
        pool.close()
    finally:
        ray.shutdown()

    ok = all(r.ok for r in outcome.results) and len(outcome.results) == args.points
    print(f"quickstart sweep of {args.points} points ({args.steps or 'default'} steps), {args.workers} Ray workers x 1 thread vs local x 1 thread")
    print(f"local: {local_s:.2f} s ({local_s / args.points:.3f} s/point); warm-up {local_warm:.2f} s")
    print(f"ray:   {ray_s:.2f} s ({ray_s / args.points:.3f} s/point); cluster+workers start {start_s:.2f} s, warm-up {ray_warm:.2f} s")
    print(f"speed ratio: {local_s / ray_s:.2f}x")
    print(f"outputs identical: {ok and same(work / 'local', work / 'ray', args.points)}")
    print(f"model loads: local {local_loads}; ray workers {loads} (for {args.points + args.workers} points each side)")


if __name__ == "__main__":
    main()
