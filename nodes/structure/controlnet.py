"""ControlNet: apply (a model patch), load, build from a UNet, save.

**Apply.** :class:`ControlNetPatch` is a :class:`~dagfusion.model.ModelPatch` whose ``begin``
returns a :class:`ControlNetHook`. On every denoiser call the hook runs the ControlNet on
``call.sample``, ``call.timestep``, the call's ``encoder_hidden_states`` (and SDXL's
``added_cond_kwargs``) and the control map, and passes the residuals to the UNet through
``call.replace(kwargs=...)`` as ``down_block_additional_residuals`` /
``mid_block_additional_residual``. So it composes with everything else that sees denoiser calls:
quantizers change the UNet's weights underneath, and caches inside (DeepCache's shallow branch)
receive the residuals in the call's keyword inputs. Apply ControlNets **before** a cache node, so
their hooks are outside the cache's and run on every step.

The arithmetic is ``StableDiffusionControlNetPipeline``'s, step for step:

- the control map is resized to the latents' pixel size (nearest neighbour, as the pipeline's
  control image processor resizes tensors), not normalised (``[0, 1]``), one map repeated over
  the batch, and doubled for the two guidance halves;
- the scale at step ``i`` of ``n`` is ``strength · keep``, ``keep = 0`` when
  ``i / n < start`` or ``(i + 1) / n > end`` (``control_guidance_start``/``_end``; the
  ControlNet does not run on those steps, which changes no number: the pipeline adds zeros);
- guess mode (or a ControlNet with ``global_pool_conditions``) runs the ControlNet on the
  conditional half only, with diffusers' logspace scales from 0.1 to 1 over the residuals, and
  adds zeros to the unconditional half;
- several ControlNet patches on one model each add their residuals to those already in the call,
  the first patch's first, as ``MultiControlNetModel`` sums them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion import (
    BOOLEAN,
    DICT,
    FLOAT,
    INT,
    PATH,
    SEED,
    STRING,
    TENSOR,
    Input,
    NodeInputError,
    Output,
    Problem,
    RunContext,
    node,
)
from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook
from dagfusion.nodes.diffusion.types import MODEL
from dagfusion.nodes.structure.controlnet_maps import ControlMapError, fit_control, rows_for, stack_control
from dagfusion.nodes.structure.controlnet_model import ControlNetHandle, built_for, fit_problems
from dagfusion.nodes.structure.types import CONTROL_NET, DEPTH, NORMAL, OBJECT_MASK

__all__ = ["NODES", "ControlNetHandle", "ControlNetHook", "ControlNetPatch", "built_for", "keep_scale"]

_COLOR = "#4dd0e1"
_DTYPES = ("auto", "fp32", "fp16", "bf16")
_DEVICES = ("auto", "cpu", "cuda", "mps")


def keep_scale(index: int, total: int, start: float, end: float) -> float:
    """``1.0`` when step ``index`` of ``total`` lies in ``[start, end]`` (as fractions of the run),
    else ``0.0`` — the pipelines' ``controlnet_keep``."""
    return 1.0 - float(index / total < start or (index + 1) / total > end)


class ControlNetPatch(ModelPatch):
    """Drive a UNet with a ControlNet and a control map while sampling (see the module docstring).

    :param controlnet: The ControlNet.
    :param control: The stacked control map ``(B, C, H, W)`` in ``[0, 1]`` (:func:`stack_control`).
    :param strength: ``controlnet_conditioning_scale``.
    :param start, end: ``control_guidance_start`` / ``control_guidance_end`` (fractions of the run).
    :param guess_mode: Run the ControlNet on the conditional half only, with logspace scales.
    :param max_pixels: The largest control map (after resizing to the latents) accepted at run time.
    """

    def __init__(self, controlnet: ControlNetHandle, control: Any, *, strength: float = 1.0, start: float = 0.0,
                 end: float = 1.0, guess_mode: bool = False, max_pixels: int = 64_000_000) -> None:
        from dagfusion.fingerprint import fingerprint

        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"expected 0 <= start < end <= 1, got start {start} and end {end}")
        self.controlnet = controlnet
        self.control = control.detach().float().cpu().contiguous()
        self.strength = float(strength)
        self.start = float(start)
        self.end = float(end)
        self.guess_mode = bool(guess_mode)
        self.max_pixels = int(max_pixels)
        self.key = "dagfusion.structure.controlnet:" + json.dumps({
            "controlnet": controlnet.__dagfusion_fingerprint__(), "control": fingerprint(self.control),
            "strength": self.strength, "start": self.start, "end": self.end, "guess_mode": self.guess_mode,
        }, sort_keys=True)

    def begin(self, run: SamplingRun) -> ControlNetHook:
        import torch

        module = self.controlnet.module
        param = next(module.parameters())
        if torch.device(param.device) != torch.device(run.device):
            raise ValueError(f"the ControlNet is on {param.device} but the model samples on {run.device}; load both "
                             "on one device")
        scale = int(getattr(run.handle, "vae_scale_factor", 8))
        height, width = int(run.shape[-2]) * scale, int(run.shape[-1]) * scale
        try:
            image = fit_control(self.control, height, width, self.max_pixels)
        except ControlMapError as error:
            raise ValueError(str(error)) from None
        image = rows_for(image, int(run.shape[0])).to(device=param.device, dtype=param.dtype)
        guess = self.guess_mode or bool(module.config.get("global_pool_conditions", False))
        return ControlNetHook(module, image, self.strength, self.start, self.end, guess)


class ControlNetHook(StepHook):
    """Per-run state of a :class:`ControlNetPatch`: the ControlNet, the prepared control map and
    counters. Its report: ``{"computed": steps the ControlNet ran, "skipped": steps outside
    [start, end]}``."""

    def __init__(self, module: Any, image: Any, strength: float, start: float, end: float, guess: bool) -> None:
        self._module = module
        self._image = image
        self._strength = strength
        self._start = start
        self._end = end
        self._guess = guess
        self._in_channels = int(module.config.get("in_channels", 4))
        self._computed = 0
        self._skipped = 0

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        import torch

        scale = self._strength * keep_scale(call.step.index, call.step.total, self._start, self._end)
        if scale == 0.0:
            self._skipped += 1
            return forward(call)
        self._computed += 1
        if self._guess and len(call.batches) > 1 and "cond" in call.batches:
            sub = call.select("cond")
            down, mid = self._residuals(sub, rows_for(self._image, sub.rows), scale)
            down = [call.merge({h: d if h == "cond" else torch.zeros_like(d) for h in call.batches}) for d in down]
            mid = call.merge({h: mid if h == "cond" else torch.zeros_like(mid) for h in call.batches})
        else:
            image = rows_for(self._image, call.rows)
            image = torch.cat([image] * len(call.batches)) if len(call.batches) > 1 else image
            down, mid = self._residuals(call, image, scale)
        kwargs = dict(call.kwargs)
        before_down = kwargs.get("down_block_additional_residuals")
        before_mid = kwargs.get("mid_block_additional_residual")
        if before_down is not None:
            down = [a + b for a, b in zip(before_down, down)]
        if before_mid is not None:
            mid = before_mid + mid
        kwargs["down_block_additional_residuals"] = list(down)
        kwargs["mid_block_additional_residual"] = mid
        return forward(call.replace(kwargs=kwargs))

    def _residuals(self, call: DenoiserCall, image: Any, scale: float) -> tuple[list[Any], Any]:
        module = self._module
        dtype = image.dtype
        sample = call.sample
        if sample.shape[1] > self._in_channels:  # inpainting UNets: the latents come first, then mask and image
            sample = sample[:, : self._in_channels]
        extra: dict[str, Any] = {}
        added = call.kwargs.get("added_cond_kwargs")
        if added is not None and module.config.get("addition_embed_type") is not None:
            extra["added_cond_kwargs"] = added
        down, mid = module(
            sample.to(dtype), call.timestep, encoder_hidden_states=call.kwargs["encoder_hidden_states"].to(dtype),
            controlnet_cond=image, conditioning_scale=scale, guess_mode=self._guess, return_dict=False, **extra,
        )
        out = call.sample.dtype
        return [d.to(out) for d in down], mid.to(out)

    def end(self) -> dict[str, int]:
        return {"computed": self._computed, "skipped": self._skipped}


# --- shared node pieces -----------------------------------------------------------------------------

MAP_INPUTS = [
    Input("image", "IMAGE", optional=True, link_only=True,
          description="A control picture (B, 3, H, W) in [0, 1]: edges, pose, scribbles, a depth picture …"),
    Input("depth", DEPTH, optional=True, link_only=True,
          description="A depth map (B, 1, H, W), 1 = nearest; repeated to 3 channels for a 3-channel network."),
    Input("normal", NORMAL, optional=True, link_only=True, description="Surface normals in [-1, 1], given as (n + 1) / 2."),
    Input("mask", OBJECT_MASK, optional=True, link_only=True, description="Object masks (B, K, H, W)."),
    Input("control", TENSOR, optional=True, link_only=True,
          description="Any other stack (B, C, H, W) in [0, 1], used as is (after the maps above)."),
]
"""The control-map inputs shared by the ControlNet, adapter and training nodes (stacked in this order)."""


def control_from_inputs(ctx: RunContext, maps: Mapping[str, Any], channels: int) -> Any:
    """The stacked control map of a node's map inputs, checked against ``channels`` and the image
    pixel limit.

    :raises NodeInputError: naming the offending input (or ``image`` for the stack as a whole).
    """
    try:
        control = stack_control(maps, channels)
    except ControlMapError as error:
        raise NodeInputError(error.input or "image", str(error)) from None
    pixels = int(control.shape[-2]) * int(control.shape[-1])
    limit = int(ctx.settings.max_image_pixels)
    if pixels > limit:
        first = next(name for name in ("image", "depth", "normal", "mask", "control") if maps.get(name) is not None)
        raise NodeInputError(first, f"the control map is {control.shape[-1]}×{control.shape[-2]} = {pixels:,} pixels, "
                                    f"more than the limit of {limit:,} (max_image_pixels in the settings)")
    return control


def warn_if_cached(ctx: RunContext, model: Any, what: str) -> None:
    """Log a warning when ``model`` already carries a cache patch: a cache's hook is then outside
    this one, and on the steps it answers from its cache the ControlNet or adapter (``what``) would not run."""
    cached = [type(p).__name__ for p in model.patches if type(p).__module__.startswith("dagfusion.nodes.cache")]
    logger = getattr(ctx, "logger", None)
    if cached and logger is not None:
        logger.warning("the model already carries %s: apply the %s before caching, or it is skipped on the cached "
                       "steps", ", ".join(cached), what)


def check_range(values: Mapping[str, Any]) -> Iterator[Problem]:
    """``start`` must be below ``end`` (silent while either is linked)."""
    start, end = values.get("start"), values.get("end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and not start < end:
        yield Problem("bad-range", f"end ({end}) must be greater than start ({start})", input="end")


@functools.lru_cache(maxsize=2)
def tiny_controlnet(conditioning_channels: int = 3) -> ControlNetHandle:
    """A ControlNet for the tiny SD model of :mod:`dagfusion.testing.models` (node examples, tests)."""
    from dagfusion.nodes.structure.controlnet_model import from_unet
    from dagfusion.testing import models as tiny

    model = tiny.sd_handles()["model"]
    handle = from_unet(model.denoiser, conditioning_channels=conditioning_channels, seed=0, source="tiny",
                       fingerprint=f"tiny-controlnet:{conditioning_channels}",
                       embedding_channels=embedding_channels(model.vae_scale_factor))
    _randomise_zero_convs(handle.module, seed=1)
    return ControlNetHandle.from_module(handle.module, source="tiny controlnet")


def _randomise_zero_convs(module: Any, seed: int) -> None:
    """Give the zero convolutions of a fresh ControlNet small random weights (examples and tests
    need residuals that change the output)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """``conditioning_embedding_out_channels`` whose downsampling (``2^(n-1)``) is ``vae_scale_factor``:
    diffusers' default ``(16, 32, 96, 256)`` for a factor of 8, shorter for smaller factors."""
    steps = max(int(vae_scale_factor).bit_length() - 1, 0)
    if 2 ** steps != vae_scale_factor:
        raise ValueError(f"the VAE scale factor must be a power of 2, got {vae_scale_factor}")
    base = (16, 32, 96, 256)
    if steps + 1 <= len(base):
        return base[: steps + 1]
    return base + tuple(256 for _ in range(steps + 1 - len(base)))


def conditioning_downscale(config: Mapping[str, Any]) -> int:
    """How much a ControlNet's conditioning embedding shrinks the control map."""
    return 2 ** (len(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1)


def _fits(model: Any, controlnet: ControlNetHandle) -> None:
    problems = fit_problems(controlnet.info, model.denoiser)
    module = controlnet.module
    downscale = conditioning_downscale(module.config)
    if not problems and downscale != model.vae_scale_factor:
        problems.append(f"the ControlNet shrinks control maps {downscale}× to the latents, the model's VAE "
                        f"{model.vae_scale_factor}×")
    if problems:
        raise NodeInputError("control_net", "this ControlNet does not fit the model: " + "; ".join(problems))


# --- Apply ----------------------------------------------------------------------------------------


def _apply_example(**settings: Any) -> Any:
    def make() -> dict[str, Any]:
        import torch
        from dagfusion.testing import models as tiny

        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        return {"model": tiny.sd_handles()["model"], "control_net": tiny_controlnet(), "image": image, **settings}

    return make


def _apply_depth_example() -> dict[str, Any]:
    import torch
    from dagfusion.testing import models as tiny

    depth = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    return {"model": tiny.sd_handles()["model"], "control_net": tiny_controlnet(), "depth": depth, "strength": 0.7,
            "guess_mode": True}


@node(
    "dagfusion.structure.ApplyControlNet",
    version="1.0.0",
    category="structure/controlnet",
    inputs=[
        Input("model", MODEL, link_only=True, description="The UNet model to control (a new handle is returned)."),
        Input("control_net", CONTROL_NET, link_only=True, description="A ControlNet built for this model's UNet."),
        *MAP_INPUTS,
        Input("strength", FLOAT, 1.0, min=0.0, max=10.0, description="Scale of the residuals (controlnet_conditioning_scale)."),
        Input("start", FLOAT, 0.0, min=0.0, max=1.0, description="Fraction of the steps after which the ControlNet starts."),
        Input("end", FLOAT, 1.0, min=0.0, max=1.0, description="Fraction of the steps after which it stops."),
        Input("guess_mode", BOOLEAN, False,
              description="Run the ControlNet on the conditional half only, residuals scaled from 0.1 (shallow) to 1 (deep)."),
    ],
    outputs=[Output("model", MODEL, "The model with the ControlNet applied while sampling (chain for several).")],
    check=check_range,
    examples=[_apply_example(), _apply_example(strength=0.5, start=0.25, end=0.75), _apply_depth_example],
    ui={"color": _COLOR},
)
def apply_controlnet(
    ctx: RunContext, model: Any, control_net: ControlNetHandle, image: Any, depth: Any, normal: Any, mask: Any,
    control: Any, strength: float, start: float, end: float, guess_mode: bool,
) -> Any:
    """Steer a UNet with a ControlNet and a control map, exactly as StableDiffusionControlNetPipeline
    does (resizing, guidance halves, start/end, guess mode). Maps are stacked image, depth, normal,
    mask, control; a lone depth map or one-object mask is repeated to 3 channels for a 3-channel
    ControlNet. Chain several for multi-ControlNet (their residuals add up); apply them before a
    cache node.
    """
    if not start < end:
        raise NodeInputError("end", f"end ({end}) must be greater than start ({start})")
    _fits(model, control_net)
    maps = {"image": image, "depth": depth, "normal": normal, "mask": mask, "control": control}
    tensor = control_from_inputs(ctx, maps, control_net.conditioning_channels)
    warn_if_cached(ctx, model, "ControlNet")
    return model.with_patch(ControlNetPatch(control_net, tensor, strength=strength, start=start, end=end,
                                            guess_mode=guess_mode, max_pixels=int(ctx.settings.max_image_pixels)))


# --- Load -----------------------------------------------------------------------------------------


def _load_example(single: bool) -> Any:
    def make(folder: Any) -> dict[str, Any]:
        from dagfusion.nodes.structure.controlnet_model import save_folder, save_single_file

        handle = tiny_controlnet()
        if single:
            return {"path": str(save_single_file(handle, folder / "tiny-controlnet.safetensors")), "dtype": "fp32",
                    "device": "cpu"}
        return {"path": str(save_folder(handle, folder / "tiny-controlnet")), "dtype": "fp32", "device": "cpu"}

    return make


@node(
    "dagfusion.structure.LoadControlNet",
    version="1.0.0",
    category="structure/controlnet",
    inputs=[
        Input("path", PATH, description="A diffusers ControlNet folder, or one .safetensors file (under the read folders)."),
        Input("architecture", STRING, "auto", choices=("auto", "sd15", "sd21"),
              description="For an original-layout single file: the shipped config to use ('auto': from the cross-attention width)."),
        Input("config", PATH, optional=True,
              description="A folder with the ControlNet's config.json, for single files of other architectures."),
        Input("device", STRING, "auto", choices=_DEVICES,
              description="Where to compute; 'auto' takes the settings' device (load it where the model computes)."),
        Input("dtype", STRING, "auto", choices=_DTYPES, description="Weight precision; 'auto' is fp16 on a GPU, fp32 on the CPU."),
    ],
    outputs=[Output("control_net", CONTROL_NET, "The ControlNet, with what it was built for.")],
    examples=[_load_example(False), _load_example(True)],
    ui={"color": _COLOR},
)
def load_controlnet_node(ctx: RunContext, path: str, architecture: str, config: str | None, device: str,
                         dtype: str) -> ControlNetHandle:
    """Load a ControlNet offline, safetensors only: a diffusers folder (from_pretrained,
    local files only), a single file written by SaveControlNet (read back exactly), or an
    original-layout single file with the shipped SD 1.5 / SD 2.1 config or the given one.
    """
    from dagfusion.nodes.diffusion.loaders import placement
    from dagfusion.nodes.structure.controlnet_model import load_controlnet

    source = ctx.settings.check_tree_readable(ctx.input_path(path))
    folder = ctx.settings.check_tree_readable(ctx.input_path(config)) if config else None
    device, dtype = placement(ctx, device, dtype)
    try:
        return load_controlnet(source, architecture=architecture, config=folder, dtype=dtype, device=device)
    except (ValueError, FileNotFoundError) as error:
        raise NodeInputError("path", str(error)) from None


EMBEDDED = {"shapes-mask": "shapes-controlnet-mask.safetensors", "shapes-refiner": "shapes-refiner.safetensors"}
"""The ControlNets shipped with dagfusion: name → file in ``nodes/structure/models``."""


def embedded_path(name: str) -> Any:
    """The shipped file of the embedded ControlNet ``name``."""
    from pathlib import Path

    return Path(__file__).with_name("models") / EMBEDDED[name]


@node(
    "dagfusion.structure.LoadEmbeddedControlNet",
    version="1.1.0",
    category="structure/controlnet",
    inputs=[
        Input("name", STRING, "shapes-mask", choices=tuple(EMBEDDED),
              description="'shapes-mask': shapes-sd's ControlNet guided by an object mask (1 channel, 1 = object; "
                          "apply it in guess mode at strength 2, see docs/controlnet.md); "
                          "'shapes-refiner': the structure-guided refiner for shapes-sd-two-objects (6 channels: "
                          "depth, normals, a 2-channel box layout, as StructureCondition stacks them)."),
        Input("device", STRING, "auto", choices=_DEVICES,
              description="Where to compute; 'auto' takes the settings' device (load it where the model computes)."),
        Input("dtype", STRING, "auto", choices=_DTYPES, description="Weight precision; 'auto' is fp16 on a GPU, fp32 on the CPU."),
    ],
    outputs=[Output("control_net", CONTROL_NET, "The shipped ControlNet (trained by workflows/train_controlnet_shapes.yaml "
                                                "or, the refiner, workflows/train_structure_refiner.yaml).")],
    examples=[{"name": "shapes-mask", "device": "cpu", "dtype": "fp32"}],
    ui={"color": _COLOR},
)
def load_embedded_controlnet(ctx: RunContext, name: str, device: str, dtype: str) -> ControlNetHandle:
    """Load a ControlNet shipped with dagfusion (package data, offline)."""
    from dagfusion.nodes.diffusion.loaders import placement
    from dagfusion.nodes.structure.controlnet_model import load_controlnet

    device, dtype = placement(ctx, device, dtype)
    return load_controlnet(embedded_path(name), dtype=dtype, device=device)


# --- from a UNet ----------------------------------------------------------------------------------


def _from_unet_example(channels: int) -> Any:
    def make() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        return {"model": tiny.sd_handles()["model"], "conditioning_channels": channels, "seed": 1}

    return make


@node(
    "dagfusion.structure.ControlNetFromUNet",
    version="1.0.0",
    category="structure/controlnet",
    inputs=[
        Input("model", MODEL, link_only=True, description="The UNet model whose encoder the ControlNet copies."),
        Input("conditioning_channels", INT, 3, min=1, max=64,
              description="Channels of the control maps it will take (3 for pictures; e.g. 1 + 3 + 1 for depth + normal + mask)."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds the conditioning embedding's initial weights."),
    ],
    outputs=[Output("control_net", CONTROL_NET, "A new ControlNet: the UNet's encoder, zero convolutions at zero.")],
    examples=[_from_unet_example(3), _from_unet_example(5)],
    ui={"color": _COLOR},
)
def controlnet_from_unet(ctx: RunContext, model: Any, conditioning_channels: int, seed: int) -> ControlNetHandle:
    """Start a ControlNet for training from a model's UNet (ControlNetModel.from_unet): encoder
    weights copied, zero convolutions at zero (it changes nothing until trained), the conditioning
    embedding sized so control maps at the picture's resolution reach the latents' (the VAE's
    scale factor).
    """
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.structure.controlnet_model import from_unet

    unet = model.denoiser
    names = {c.__name__ for c in type(unet).__mro__}
    if "UNet2DConditionModel" not in names:
        raise NodeInputError("model", f"ControlNets are built from UNet2DConditionModel denoisers, got {type(unet).__name__}")
    try:
        channels = embedding_channels(model.vae_scale_factor)
    except ValueError as error:
        raise NodeInputError("model", str(error)) from None
    fp = "from-unet:" + str(fingerprint({"model": model.ref.fingerprint, "channels": conditioning_channels,
                                         "seed": seed, "embedding": list(channels)}))
    return from_unet(unet, conditioning_channels=conditioning_channels, seed=seed,
                     source=f"from the UNet of {model.info.get('source', '?')}", fingerprint=fp,
                     embedding_channels=channels)


# --- Save -----------------------------------------------------------------------------------------


def _save_example(fmt: str) -> Any:
    def make() -> dict[str, Any]:
        name = "controlnet/tiny" + (".safetensors" if fmt == "safetensors" else "")
        if fmt == "safetensors":
            return {"control_net": tiny_controlnet(), "filename": name, "format": fmt, "dtype": "fp16",
                    "provenance": {"steps": 2}}
        return {"control_net": tiny_controlnet(), "filename": name, "format": fmt}

    return make


@node(
    "dagfusion.structure.SaveControlNet",
    version="1.1.0",
    category="structure/controlnet",
    inputs=[
        Input("control_net", CONTROL_NET, link_only=True, description="The ControlNet to write."),
        Input("filename", STRING, "controlnet", description="Name inside the run's output folder (a folder, or a .safetensors file)."),
        Input("format", STRING, "diffusers", choices=("diffusers", "safetensors"),
              description="'diffusers': a folder for ControlNetModel.from_pretrained; 'safetensors': one file with the config in its metadata."),
        Input("dtype", STRING, "fp32", choices=("fp32", "fp16"), description="Precision of the written weights (single file)."),
        Input("provenance", DICT, optional=True,
              description="Plain facts to record in the single file's metadata (training workflow, steps, data seed …)."),
    ],
    outputs=[Output("path", STRING, "Where it was written.")],
    pure=False,
    output_node=True,
    examples=[_save_example("diffusers"), _save_example("safetensors")],
    ui={"color": _COLOR},
)
def save_controlnet(ctx: RunContext, control_net: ControlNetHandle, filename: str, format: str, dtype: str,
                    provenance: dict[str, Any] | None) -> str:
    """Write a ControlNet: a diffusers folder (config.json + safetensors), or one safetensors file
    with diffusers tensor names and the config and provenance in its metadata. LoadControlNet
    reads either back exactly.
    """
    from dagfusion.nodes.structure.controlnet_model import save_folder, save_single_file

    if format == "safetensors":
        if not filename.endswith(".safetensors"):
            raise NodeInputError("filename", f"a single file needs a name ending in .safetensors, got {filename!r}")
        extra = {"provenance": {str(k): v for k, v in (provenance or {}).items()}, "dagfusion.run": str(ctx.run_id)}
        return str(save_single_file(control_net, ctx.output_path(filename), extra, dtype))
    if dtype != "fp32" or provenance:
        raise NodeInputError("format", "dtype and provenance apply to the single-file format; use format 'safetensors'")
    if filename.endswith(".safetensors"):
        raise NodeInputError("filename", f"format 'diffusers' writes a folder; {filename!r} names a file")
    return str(save_folder(control_net, ctx.output_path(filename)))


NODES = (apply_controlnet, load_controlnet_node, load_embedded_controlnet, controlnet_from_unet, save_controlnet)
"""The ControlNet nodes, in palette order."""
