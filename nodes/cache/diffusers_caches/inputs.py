"""The inputs of the diffusers-cache nodes, declared once, and the checks relating them.

Each per-method node takes the inputs of its method only; the deprecated all-in-one
``DiffusersCache`` takes all of them. The checks run at validation time on constant inputs and,
through :func:`~dagfusion.nodes.cache.checks.enforce`, at run time on linked ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion import FLOAT, INT, STRING, Input, Problem
from dagfusion.nodes.cache.diffusers_caches.config import NO_RATIOS, parse_mag_ratios, parse_timestep_range
from dagfusion.nodes.diffusion.types import MODEL

MODEL_INPUT = Input("model", MODEL, link_only=True, description="The denoiser to speed up (UNet, DiT or PixArt).")
THRESHOLD = Input(
    "threshold", FLOAT, 0.05, min=0.0, max=10.0,
    description="Skip the remaining blocks while the first block's output changed by less than this (relative mean "
                "difference) since it last ran in full; 0.05-0.2 typical, higher is faster.",
)
SPATIAL = Input(
    "spatial_attention_block_skip_range", INT, 2, min=0, max=100,
    description="Compute self-attention every N-th call and reuse it in between (0 = never skip).",
)
CROSS = Input(
    "cross_attention_block_skip_range", INT, 6, min=0, max=100,
    description="Compute cross-attention every N-th call (0 = never skip).",
)
TIMESTEP_RANGE = Input(
    "timestep_skip_range", STRING, "",
    description="'low, high' - attention (and FasterCache's unconditional half) is reused only at timesteps strictly "
                "between them; empty = diffusers' defaults (PAB 100, 800; FasterCache -1, 681 for attention and "
                "-1, 641 for the unconditional half).",
)
UNCOND = Input(
    "unconditional_batch_skip_range", INT, 5, min=1, max=100,
    description="Compute the unconditional half of guidance every N-th step and approximate it from the "
                "conditional half in between (1 = never skip).",
)
CACHE_INTERVAL = Input(
    "cache_interval", INT, 5, min=1, max=100,
    description="After each full computation, predict the cached modules for this many steps minus one before "
                "computing again.",
)
MAX_ORDER = Input(
    "max_order", INT, 1, min=0, max=4,
    description="Order of the Taylor expansion (0 reuses features, 1 extrapolates linearly).",
)
BEFORE = Input(
    "disable_cache_before_step", INT, 3, min=1, max=1000,
    description="The first steps that always compute (they give the expansion its differences).",
)
MAG_THRESHOLD = Input(
    "mag_threshold", FLOAT, 0.06, min=0.0, max=10.0,
    description="Skip the blocks while the accumulated magnitude error stays below this; higher is faster.",
)
MAX_SKIP = Input("max_skip_steps", INT, 3, min=1, max=100,
                 description="At most this many consecutive steps skip the blocks.")
RETENTION = Input("retention_ratio", FLOAT, 0.2, min=0.0, max=1.0,
                  description="The first fraction of the steps never skips.")
MAG_RATIOS = Input(
    "mag_ratios", STRING, "",
    description="The model's magnitude ratios, comma-separated, one per step (resampled to the run's step count); "
                "link dagfusion.cache.MagCacheCalibrate's output here.",
)


def check_timestep_range(values: Mapping[str, Any]) -> Iterator[Problem]:
    """``timestep_skip_range`` is empty or ``'low, high'`` with ``low < high``."""
    text = values.get("timestep_skip_range")
    if isinstance(text, str):
        try:
            parse_timestep_range(text)
        except ValueError as exc:
            yield Problem("bad-timestep-range", str(exc), input="timestep_skip_range")


def check_pab_skips(values: Mapping[str, Any]) -> Iterator[Problem]:
    """Pyramid Attention Broadcast skips something: one of its two skip ranges is not 0."""
    spatial, cross = values.get(SPATIAL.name), values.get(CROSS.name)
    if spatial == 0 and cross == 0:
        yield Problem(
            "skips-nothing",
            "pyramid_attention_broadcast with spatial_attention_block_skip_range and cross_attention_block_skip_range "
            "both 0 would skip nothing; set one of them to 2 or more",
            input=SPATIAL.name,
        )


def check_mag_ratios(values: Mapping[str, Any]) -> Iterator[Problem]:
    """``mag_ratios`` is a non-empty list of positive numbers (silent when linked)."""
    text = values.get(MAG_RATIOS.name)
    if not isinstance(text, str):
        return
    try:
        ratios = parse_mag_ratios(text)
    except ValueError as exc:
        yield Problem("bad-mag-ratios", str(exc), input=MAG_RATIOS.name)
        return
    if not ratios:
        yield Problem("missing-mag-ratios", NO_RATIOS, input=MAG_RATIOS.name)
