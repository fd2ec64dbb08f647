"""Train the shipped ShapeEval-pair classifier (two-object shapes-world images) and measure it.

Trains :func:`dagfusion.nodes.metrics.pair_evaluator.train_pair_evaluator` with the settings
below (seeded; one CPU thread, so the result is reproducible on a CPU), rounds the weights to
fp16, measures per-head accuracy on held-out (eval split) renders of both styles, and writes
``nodes/metrics/weights/shapeeval_pair.safetensors`` with the provenance (script, settings,
accuracy) in its metadata.

Usage::

    python benchmarks/train_pair_evaluator.py                 # writes the shipped file
    python benchmarks/train_pair_evaluator.py --out /tmp/pair.safetensors --steps 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

STEPS = 2000
SEED = 0
DATA_SEED = 0
EVAL_COUNT = 2048
EVAL_SEED = 4242


def main() -> None:
    from dagfusion.nodes.metrics.pair_evaluator import (
        SHIPPED,
        PairEvalNet,
        held_out_set,
        save_pair_evaluator,
        score,
        train_pair_evaluator,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(SHIPPED))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--data-seed", type=int, default=DATA_SEED)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def progress(step: int, total: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    start = time.perf_counter()
    model, report = train_pair_evaluator(steps=args.steps, seed=args.seed, data_seed=args.data_seed, progress=progress)
    # measure the weights as shipped: rounded to fp16
    shipped = PairEvalNet()
    shipped.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    shipped.eval()
    images, captions = held_out_set(EVAL_COUNT, EVAL_SEED)
    accuracy = score(shipped, images, captions)
    print(f"trained in {report.seconds:.0f} s; final loss {report.final_loss:.4f}")
    print(f"held-out accuracy ({EVAL_COUNT} renders, eval split, flat + solid, seed {EVAL_SEED}):")
    print(json.dumps({k: round(v, 4) for k, v in accuracy.items()}))
    save_pair_evaluator(
        shipped,
        args.out,
        extra={
            "script": "benchmarks/train_pair_evaluator.py",
            "steps": args.steps,
            "seed": args.seed,
            "data_seed": args.data_seed,
            "settings": json.dumps(report.settings, sort_keys=True),
            "threads": args.threads,
            "torch": torch.__version__,
            "eval_count": EVAL_COUNT,
            "eval_seed": EVAL_SEED,
            "accuracy": json.dumps({k: round(v, 4) for k, v in accuracy.items()}, sort_keys=True),
            "final_loss": round(report.final_loss, 5),
            "train_seconds": round(report.seconds, 1),
        },
        dtype=torch.float16,
    )
    print(f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
