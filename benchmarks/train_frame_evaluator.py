"""Train the shipped ShapeEval-frames classifier (shapes-video frames) and measure it.

Trains :func:`dagfusion.nodes.metrics.frame_evaluator.train_frame_evaluator` with the settings
below (seeded, one CPU thread: reproducible on a CPU), rounds the weights to fp16, measures
per-frame accuracy on the held-out clips (eval split, another render seed), compares with the
still-image ShapeEval on the same frames, and writes
``nodes/metrics/weights/shapeeval_frames.safetensors`` with its provenance in the metadata.

Usage::

    python benchmarks/train_frame_evaluator.py                      # writes the shipped file
    python benchmarks/train_frame_evaluator.py --out /tmp/f.safetensors --steps 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

STEPS = 600
SEED = 0
CLIPS = 1536
EVAL_CLIPS = 103
EVAL_SEED = 7


def held_out(seed: int = EVAL_SEED) -> tuple[torch.Tensor, list[str]]:
    from dagfusion.nodes.shapes.motion import ShapesVideoDataset

    data = ShapesVideoDataset("eval", resolution=64, seed=seed)
    batch = data.batch(0, EVAL_CLIPS)
    return batch.video, list(batch.captions)


def main(argv: list[str] | None = None) -> None:
    from dagfusion.nodes.metrics.evaluator import SHIPPED as SHAPEEVAL
    from dagfusion.nodes.metrics.evaluator import load_shapeeval
    from dagfusion.nodes.metrics.frame_evaluator import (
        SHIPPED,
        load_frame_evaluator,
        save_frame_evaluator,
        train_frame_evaluator,
    )
    from dagfusion.nodes.metrics.video import score_frames

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(SHIPPED))
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, seconds = train_frame_evaluator(steps=args.steps, seed=SEED, clips=CLIPS)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    extra = {"trained_by": "benchmarks/train_frame_evaluator.py", "steps": args.steps, "seed": SEED,
             "data": f"shapes-video train split, {CLIPS} clips x 8 frames, 64 px, data seed {SEED}",
             "project_commit": commit, "train_seconds": round(seconds, 1)}
    save_frame_evaluator(model, args.out, extra)
    shipped = load_frame_evaluator(args.out)  # the fp16-rounded weights are what is measured
    video, descriptions = held_out()
    frames = score_frames(shipped, video, descriptions)
    still = score_frames(load_shapeeval(SHAPEEVAL), video, descriptions)
    result = {"frames_evaluator": frames, "shapeeval_on_frames": still, "train_seconds": round(seconds, 1),
              "held_out_clips": EVAL_CLIPS, "eval_seed": EVAL_SEED}
    save_frame_evaluator(shipped, args.out, {**extra, "held_out_accuracy": json.dumps(frames)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
