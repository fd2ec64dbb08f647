"""A diffusers cache's settings: the immutable :class:`CacheSettings`, the diffusers config they
build, and parsing of the text inputs (timestep ranges, magnitude ratios)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dagfusion.nodes.cache.diffusers_caches.support import (
    DEFAULT_TIMESTEP_RANGES,
    FASTER_UNCOND_RANGE,
    METHODS,
    TAYLORSEER_MODULES,
)

# --- settings and configs ---------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSettings:
    """Everything that shapes one method's diffusers config (plain, immutable values).

    ``timestep_range`` ``None`` means the method's diffusers default; ``mag_ratios`` empty with
    ``calibrate`` true is MagCache's calibration mode (no skipping, ratios measured).
    """

    method: str
    threshold: float = 0.05
    spatial_attention_block_skip_range: int = 2
    cross_attention_block_skip_range: int = 6
    timestep_range: tuple[float, float] | None = None
    unconditional_batch_skip_range: int = 5
    cache_interval: int = 5
    max_order: int = 1
    disable_cache_before_step: int = 3
    mag_threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] = ()
    calibrate: bool = False

    def relevant(self) -> dict[str, Any]:
        """The settings the method uses (the patch key holds only these)."""
        m = self.method
        if m == "first_block_cache":
            return {"threshold": self.threshold}
        if m == "pyramid_attention_broadcast":
            return {"spatial": self.spatial_attention_block_skip_range, "cross": self.cross_attention_block_skip_range,
                    "timesteps": list(self.timesteps())}
        if m == "faster_cache":
            return {"spatial": self.spatial_attention_block_skip_range, "uncond": self.unconditional_batch_skip_range,
                    "timesteps": list(self.timesteps())}
        if m == "taylorseer":
            return {"interval": self.cache_interval, "order": self.max_order, "before": self.disable_cache_before_step}
        return {"threshold": self.mag_threshold, "max_skip": self.max_skip_steps, "retention": self.retention_ratio,
                "ratios": [round(r, 6) for r in self.mag_ratios], "calibrate": self.calibrate}

    def timesteps(self) -> tuple[float, float]:
        return self.timestep_range or DEFAULT_TIMESTEP_RANGES.get(self.method, (100.0, 800.0))


class Clock:
    """The current sampling timestep, written by the step hook and read by diffusers' callbacks."""

    def __init__(self) -> None:
        self.timestep: float | None = None

    def __call__(self) -> float:
        if self.timestep is None:
            raise RuntimeError(
                "the diffusers cache asked for the current timestep outside a denoiser call; the patch's step "
                "hook (begin) sets it — run the model through dagfusion's sampler"
            )
        return self.timestep


def build_config(settings: CacheSettings, clock: Any) -> Any:
    """The diffusers config object for ``settings`` (``clock()`` gives the current timestep)."""
    import torch

    m = settings.method
    if m == "first_block_cache":
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=settings.threshold)
    if m == "pyramid_attention_broadcast":
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        timesteps = settings.timesteps()
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=settings.spatial_attention_block_skip_range or None,
            cross_attention_block_skip_range=settings.cross_attention_block_skip_range or None,
            spatial_attention_timestep_skip_range=timesteps,
            cross_attention_timestep_skip_range=timesteps,
            current_timestep_callback=clock,
        )
    if m == "faster_cache":
        from diffusers.hooks import FasterCacheConfig

        given = settings.timestep_range
        return FasterCacheConfig(
            spatial_attention_block_skip_range=settings.spatial_attention_block_skip_range or None,
            spatial_attention_timestep_skip_range=settings.timesteps(),
            unconditional_batch_skip_range=settings.unconditional_batch_skip_range,
            unconditional_batch_timestep_skip_range=given or FASTER_UNCOND_RANGE,
            attention_weight_callback=lambda _module: 0.5,  # diffusers' default, given to silence its warning
            tensor_format="BCHW",
            current_timestep_callback=clock,
        )
    if m == "taylorseer":
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=settings.cache_interval,
            disable_cache_before_step=settings.disable_cache_before_step,
            max_order=settings.max_order,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[TAYLORSEER_MODULES],
        )
    if m == "mag_cache":
        from diffusers.hooks import MagCacheConfig

        if settings.calibrate:
            return MagCacheConfig(calibrate=True)
        if not settings.mag_ratios:
            raise ValueError(NO_RATIOS)
        ratios = torch.tensor(settings.mag_ratios, dtype=torch.float32)
        return MagCacheConfig(
            threshold=settings.mag_threshold, max_skip_steps=settings.max_skip_steps,
            retention_ratio=settings.retention_ratio, num_inference_steps=len(ratios), mag_ratios=ratios,
        )
    raise ValueError(f"unknown diffusers cache method {m!r}; expected one of {list(METHODS)}")


NO_RATIOS = (
    "mag_cache needs the model's magnitude ratios (they depend on the checkpoint and the scheduler): measure "
    "them with the dagfusion.cache.MagCacheCalibrate node and link its mag_ratios output to the mag_ratios input"
)


def apply_function(method: str) -> Any:
    """diffusers' ``apply_*(module, config)`` function of ``method``."""
    import diffusers.hooks as hooks

    return {
        "first_block_cache": hooks.apply_first_block_cache,
        "pyramid_attention_broadcast": hooks.apply_pyramid_attention_broadcast,
        "faster_cache": hooks.apply_faster_cache,
        "taylorseer": hooks.apply_taylorseer_cache,
        "mag_cache": hooks.apply_mag_cache,
    }[method]



# --- parsing ----------------------------------------------------------------------------------


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """``"1.0, 0.98 1.02"`` -> ``(1.0, 0.98, 1.02)``; brackets are ignored (a pasted Python list works)."""
    values = []
    for part in text.replace("[", " ").replace("]", " ").replace(",", " ").split():
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{what}: expected numbers separated by commas, got {part!r} in {text!r}") from None
    return tuple(values)


def parse_timestep_range(text: str) -> tuple[float, float] | None:
    """``""`` -> ``None`` (the method's default); ``"100, 800"`` -> ``(100.0, 800.0)``."""
    if not text.strip():
        return None
    values = parse_floats(text, "timestep_skip_range")
    if len(values) != 2 or not values[0] < values[1]:
        raise ValueError(
            f"timestep_skip_range: expected two timesteps 'low, high' with low < high (like '100, 800'), got {text!r}"
        )
    return (values[0], values[1])


def parse_mag_ratios(text: str) -> tuple[float, ...]:
    values = parse_floats(text, "mag_ratios")
    bad = [v for v in values if not v > 0]
    if bad:
        raise ValueError(f"mag_ratios must be positive magnitude ratios, got {bad[:3]}")
    return values

