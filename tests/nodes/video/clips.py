"""Test clips and a run context for calling the video nodes directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from dagfusion import CancelToken, EventCollector, RunContext
from dagfusion.testing import make_settings

WORKFLOW = """format_version: 1
nodes:
  noise: {type: dagfusion.tensor.Noise, inputs: {seed: 7, height: 8, width: 8}}
"""


def smooth_clip(frames: int = 12, height: int = 48, width: int = 64, clips: int = 1) -> torch.Tensor:
    """``(clips, frames, 3, height, width)``: gradients and a soft blob moving across them."""
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    out = []
    for c in range(clips):
        clip = []
        for f in range(frames):
            t = f / max(1, frames - 1)
            cx, cy = 0.2 + 0.6 * t, 0.3 + 0.2 * c
            blob = torch.exp(-(((x - cx) ** 2) + ((y - cy) ** 2)) / 0.02)
            red = (0.2 + 0.6 * x * (1 - 0.3 * t) + 0.2 * blob).clamp(0, 1)
            green = (0.1 + 0.7 * y + 0.0 * x).clamp(0, 1).expand(1, height, width)
            blue = (0.3 + 0.5 * blob + 0.1 * c).clamp(0, 1)
            clip.append(torch.cat([red.expand(1, height, width), green, blue.expand(1, height, width)]))
        out.append(torch.stack(clip))
    return torch.stack(out).contiguous()


def context(folder: Path, node_id: str = "node", workflow: str | None = WORKFLOW, **settings: Any) -> RunContext:
    """A run context over ``make_settings(folder, **settings)`` whose events go to ``ctx.handler.events``."""
    chosen = make_settings(folder, **settings)
    provenance = {"workflow": workflow, "manifest": {"run": "test"}} if workflow is not None else {}
    return RunContext(
        node_id=node_id, run_id="test-run", settings=chosen, output_dir=chosen.output_dir,
        cancel_token=CancelToken(), handler=EventCollector(), provenance=provenance,
    )


def save(ctx: RunContext, video: torch.Tensor, format: str, **options: Any) -> dict[str, Any]:
    from dagfusion.nodes.video.nodes import save_video

    inputs = {"filename_prefix": "clips/clip", "fps": 8.0, "crf": 18, "quality": 90, "loop": 0, "embed_workflow": True}
    return save_video.fn(ctx, video=video, format=format, **{**inputs, **options})


def load(ctx: RunContext, path: str | Path, **options: Any) -> dict[str, Any]:
    from dagfusion.nodes.video.nodes import load_video

    inputs = {"start_frame": 0, "max_frames": 0, "stride": 1}
    return load_video.fn(ctx, path=str(path), **{**inputs, **options})
