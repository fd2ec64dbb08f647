"""The inpainting patches: latent-mask blending for ordinary models, mask conditioning for
9-channel inpainting UNets.

:class:`BlendPatch` (any model): after every scheduler step the latents outside the mask are
replaced by the original latents noised to the next step's noise level (``add_noise`` with the
sampler's own noise, or ``scale_noise`` for flow matching); after the last step by the original
latents themselves, so the final latents equal the original exactly where the mask is 0. This
is what diffusers' ``StableDiffusionInpaintPipeline`` does for 4-channel UNets.

:class:`ConditionPatch` (9-channel inpainting UNets): every denoiser call gets the latent-size
mask and the masked image's latents concatenated to its input along channels —
``[latents, mask, masked-image latents]`` — for every guidance half, as diffusers does.

Both keep their tensors on the patch (immutable) and build per-run copies on the run's device
in ``begin``; the patch key is a digest of the tensors.
"""

from __future__ import annotations

from typing import Any

from dagfusion.model import ModelPatch, SamplingRun, StepHook, StepInfo, config_of
from dagfusion.model.hooks import DenoiserCall, Forward


def _digest(*tensors: Any) -> str:
    from dagfusion.fingerprint import fingerprint

    return str(fingerprint(list(tensors)))


def _rows(tensor: Any, batch: int, what: str) -> Any:
    """``tensor`` with ``batch`` rows (one row is repeated)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"the {what} has {tensor.shape[0]} rows but the latents have {batch}; give 1 or {batch}")


def _check_spatial(run: SamplingRun, latents: Any, mask: Any, what: str) -> None:
    if len(run.shape) != 4:
        raise ValueError(f"inpainting works on image latents (B, C, h, w), not latents of shape {tuple(run.shape)}")
    if tuple(latents.shape[-2:]) != tuple(run.shape[-2:]) or tuple(mask.shape[-2:]) != tuple(run.shape[-2:]):
        raise ValueError(
            f"the {what} is for latents of {latents.shape[-1]}x{latents.shape[-2]} (width x height), but the sampler "
            f"denoises latents of {run.shape[-1]}x{run.shape[-2]}; sample a latent of the inpainted picture's size"
        )


class BlendPatch(ModelPatch):
    """Latent-mask inpainting: keep ``original`` where ``mask`` (latent size, 1 = regenerate) is 0.

    :param original: Latents ``(1 or B, C, h, w)`` of the picture (denoiser space).
    :param mask: ``(1 or B, 1, h, w)`` in [0, 1] at latent size; fractional values blend.
    """

    def __init__(self, original: Any, mask: Any) -> None:
        self.original = original.detach()
        self.mask = mask.detach()

    @property
    def key(self) -> str:  # type: ignore[override]
        return f"dagfusion.inpaint.blend:{_digest(self.original, self.mask)}"

    def begin(self, run: SamplingRun) -> StepHook:
        _check_spatial(run, self.original, self.mask, "inpainting picture")
        if self.original.shape[1] != run.shape[1]:
            raise ValueError(
                f"the inpainting picture's latents have {self.original.shape[1]} channels, the sampler's {run.shape[1]}; "
                "encode the picture with this model's VAE"
            )
        return _BlendHook(run, self.original, self.mask)


class _BlendHook(StepHook):
    def __init__(self, run: SamplingRun, original: Any, mask: Any) -> None:
        import torch
        from dagfusion.nodes.diffusion.schedulers import is_flow_matching

        batch = run.shape[0]
        self._run = run
        self._original = _rows(original, batch, "inpainting picture").to(device=run.device, dtype=run.dtype)
        self._mask = _rows(mask, batch, "mask").to(device=run.device, dtype=run.dtype)
        self._keep = 1 - self._mask
        # The sampler's own noise: the same seed, shape and dtype draw the same tensor.
        generator = torch.Generator(device="cpu").manual_seed(int(run.seed))
        self._noise = torch.randn(tuple(run.shape), generator=generator, dtype=run.dtype).to(run.device)
        self._offset = len(run.scheduler.timesteps) - run.steps
        self._flow = is_flow_matching(run.scheduler)
        self._blended = 0

    def after_step(self, step: StepInfo, latents: Any) -> Any:
        if step.is_last:
            known = self._original
        else:
            sched = self._run.scheduler
            position = self._offset + step.index + 1
            t = sched.timesteps[position:position + 1].repeat(latents.shape[0])
            if self._flow:
                known = sched.scale_noise(self._original, t, self._noise)
            else:
                known = sched.add_noise(self._original, self._noise, t)
        self._blended += 1
        return self._keep * known.to(latents.dtype) + self._mask * latents

    def end(self) -> Any:
        return {"blended_steps": self._blended, "masked_fraction": float(self._mask.float().mean())}


class ConditionPatch(ModelPatch):
    """Mask conditioning of 9-channel inpainting UNets.

    :param mask: ``(1 or B, 1, h, w)`` at latent size (binary: 1 = regenerate).
    :param masked: Latents ``(1 or B, C, h, w)`` of the picture with the masked pixels grey.
    """

    def __init__(self, mask: Any, masked: Any) -> None:
        self.mask = mask.detach()
        self.masked = masked.detach()

    @property
    def key(self) -> str:  # type: ignore[override]
        return f"dagfusion.inpaint.condition:{_digest(self.mask, self.masked)}"

    def begin(self, run: SamplingRun) -> StepHook:
        import torch

        _check_spatial(run, self.masked, self.mask, "masked picture")
        in_channels = getattr(config_of(run.module), "in_channels", None)
        need = run.shape[1] + self.mask.shape[1] + self.masked.shape[1]
        if in_channels != need:
            raise ValueError(
                f"mask conditioning needs an inpainting model taking {need} input channels "
                f"({run.shape[1]} latent + {self.mask.shape[1]} mask + {self.masked.shape[1]} masked picture), this one "
                f"takes {in_channels}; for an ordinary model use dagfusion.inpaint.Blend"
            )
        batch = run.shape[0]
        extra = torch.cat([_rows(self.mask, batch, "mask"), _rows(self.masked, batch, "masked picture")], dim=1)
        return _ConditionHook(extra.to(device=run.device, dtype=run.dtype))


class _ConditionHook(StepHook):
    def __init__(self, extra: Any) -> None:
        self._extra = extra

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        import torch

        extra = self._extra
        if call.rows != extra.shape[0]:
            extra = _rows(extra[:1], call.rows, "mask")
        extra = torch.cat([extra] * len(call.batches)) if len(call.batches) > 1 else extra
        sample = torch.cat([call.sample, extra.to(call.sample.dtype)], dim=1)
        return forward(call.replace(sample=sample))
