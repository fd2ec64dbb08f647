"""T2I-Adapter: load, build for a model, apply (a model patch), save.

**Apply.** :class:`AdapterPatch`'s hook computes the adapter's features **once per run** from the
control map (resized to the latents' pixel size when it differs), scales them by ``strength``,
and passes them to the UNet on every denoiser call as ``down_intrablock_additional_residuals``
(fresh copies: the UNet consumes the list), repeated over the batch and doubled for the two
guidance halves — ``StableDiffusionAdapterPipeline``'s arithmetic. ``conditioning_factor`` is the
SDXL adapter pipeline's ``adapter_conditioning_factor``: the features are given on the first
``int(steps · factor)`` steps only (1 = every step, the SD pipeline's behaviour). Several adapter
patches add their features up.

**Fit.** A full or light adapter gives one feature per UNet down block: block ``k`` at
``channels[k]`` and ``1 / 2^k`` of the latents' size, the first after shrinking the control map
by ``downscale_factor`` — which must be the VAE's scale factor. UNets whose blocks take the
features at those sizes (cross-attention blocks before their downsampler, a last plain block) fit;
:func:`fits` says why another does not.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dagfusion import FLOAT, INT, PATH, SEED, STRING, Input, NodeInputError, Output, RunContext, node
from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StaticRef, StepHook, as_ref
from dagfusion.nodes.diffusion.types import MODEL
from dagfusion.nodes.structure.controlnet import MAP_INPUTS, control_from_inputs, warn_if_cached
from dagfusion.nodes.structure.controlnet_maps import ControlMapError, fit_control, rows_for
from dagfusion.nodes.structure.types import T2I_ADAPTER

_COLOR = "#4db6ac"
ADAPTER_TYPES = ("full_adapter", "light_adapter")
METADATA_KEY = "dagfusion.t2i_adapter"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class AdapterHandle:
    """A T2I-Adapter by reference with what it was built for (the ``T2I_ADAPTER`` socket type).

    Attributes:
        ref: Where the ``T2IAdapter`` lives.
        info: ``source``, ``fingerprint``, ``device``, ``dtype``, ``in_channels``, ``channels``,
            ``num_res_blocks``, ``downscale_factor``, ``adapter_type``.
    """

    def __init__(self, ref: Any, info: Mapping[str, Any]) -> None:
        self.ref = as_ref(ref)
        self.info: Mapping[str, Any] = MappingProxyType(dict(info))

    @staticmethod
    def describe(config: Mapping[str, Any]) -> dict[str, Any]:
        return {"in_channels": int(config.get("in_channels", 3)), "channels": _plain(list(config.get("channels", ()))),
                "num_res_blocks": int(config.get("num_res_blocks", 2)),
                "downscale_factor": int(config.get("downscale_factor", 8)),
                "adapter_type": str(config.get("adapter_type", "full_adapter"))}

    @classmethod
    def from_module(cls, module: Any, *, source: str, fingerprint: str | None = None) -> AdapterHandle:
        """A handle over a ``T2IAdapter`` in memory; ``fingerprint`` defaults to a digest of its weights."""
        from dagfusion.fingerprint import fingerprint as digest

        fp = fingerprint or f"weights:{digest(module)}"
        param = next(module.parameters())
        info = {"source": source, "fingerprint": fp, "device": str(param.device),
                "dtype": str(param.dtype).replace("torch.", ""), **cls.describe(module.config)}
        return cls(StaticRef(module, fp), info)

    @property
    def module(self) -> Any:
        """The shared ``T2IAdapter`` (never modify it)."""
        return self.ref.get()

    @property
    def conditioning_channels(self) -> int:
        return int(self.info["in_channels"])

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    def __dagfusion_fingerprint__(self) -> str:
        return "t2i-adapter:" + json.dumps(_plain(self.info), sort_keys=True, default=str)

    def __repr__(self) -> str:
        return f"AdapterHandle({self.info.get('source', '?')!r}, in_channels={self.conditioning_channels})"


def feature_layout(unet_config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """``(channels, downscale from the latents)`` at which each down block of a UNet adds an
    adapter feature (``UNet2DConditionModel``: inside a cross-attention block before its
    downsampler; after a plain block, so after its downsampler if it has one)."""
    layout = []
    scale = 1
    types = list(unet_config.get("down_block_types", ()))
    channels = list(unet_config.get("block_out_channels", ()))
    for i, (kind, ch) in enumerate(zip(types, channels)):
        downsamples = i < len(types) - 1
        if "CrossAttn" in kind:
            layout.append((int(ch), scale))
        else:
            layout.append((int(ch), scale * 2 if downsamples else scale))
        if downsamples:
            scale *= 2
    return layout


def fit_problems(info: Mapping[str, Any], unet: Any, vae_scale_factor: int) -> list[str]:
    """Why an adapter described by ``info`` cannot feed ``unet`` (empty when it can)."""
    names = {c.__name__ for c in type(unet).__mro__}
    if "UNet2DConditionModel" not in names:
        return [f"T2I-Adapters feed UNet2DConditionModel denoisers; this model's denoiser is {type(unet).__name__}"]
    if info.get("adapter_type") not in ADAPTER_TYPES:
        return []  # other layouts (full_adapter_xl) are checked by shape when they run
    problems = []
    want = feature_layout(unet.config)
    got = [(int(c), 2 ** k) for k, c in enumerate(info.get("channels", ()))]
    if got != want:
        problems.append(f"the adapter gives features (channels, downscale) {got}, the UNet takes {want}")
    if int(info.get("downscale_factor", 8)) != int(vae_scale_factor):
        problems.append(f"the adapter shrinks control maps {info.get('downscale_factor')}× before its first feature, "
                        f"the model's VAE {vae_scale_factor}×")
    return problems


def fits(model: Any, adapter: AdapterHandle) -> None:
    """Raise unless ``adapter`` can feed ``model``'s UNet.

    :raises NodeInputError: naming what the adapter gives and what the UNet takes.
    """
    problems = fit_problems(adapter.info, model.denoiser, model.vae_scale_factor)
    if problems:
        raise NodeInputError("adapter", "this T2I-Adapter does not fit the model: " + "; ".join(problems))


# --- the patch --------------------------------------------------------------------------------------


class AdapterPatch(ModelPatch):
    """Add a T2I-Adapter's features to a UNet's encoder while sampling (see the module docstring)."""

    def __init__(self, adapter: AdapterHandle, control: Any, *, strength: float = 1.0, conditioning_factor: float = 1.0,
                 max_pixels: int = 64_000_000) -> None:
        from dagfusion.fingerprint import fingerprint

        if not 0.0 <= conditioning_factor <= 1.0:
            raise ValueError(f"conditioning_factor must be in [0, 1], got {conditioning_factor}")
        self.adapter = adapter
        self.control = control.detach().float().cpu().contiguous()
        self.strength = float(strength)
        self.conditioning_factor = float(conditioning_factor)
        self.max_pixels = int(max_pixels)
        self.key = "dagfusion.structure.t2i-adapter:" + json.dumps({
            "adapter": adapter.__dagfusion_fingerprint__(), "control": fingerprint(self.control),
            "strength": self.strength, "conditioning_factor": self.conditioning_factor,
        }, sort_keys=True)

    def begin(self, run: SamplingRun) -> AdapterHook:
        import torch

        module = self.adapter.module
        param = next(module.parameters())
        if torch.device(param.device) != torch.device(run.device):
            raise ValueError(f"the T2I-Adapter is on {param.device} but the model samples on {run.device}")
        scale = int(getattr(run.handle, "vae_scale_factor", 8))
        try:
            image = fit_control(self.control, int(run.shape[-2]) * scale, int(run.shape[-1]) * scale, self.max_pixels)
        except ControlMapError as error:
            raise ValueError(str(error)) from None
        image = rows_for(image, int(run.shape[0])).to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            features = [f * self.strength for f in module(image)]
        return AdapterHook(features, self.conditioning_factor)


class AdapterHook(StepHook):
    """Per-run state of an :class:`AdapterPatch`: the scaled features. Report: ``{"steps": steps
    that received them}``."""

    def __init__(self, features: list[Any], factor: float) -> None:
        self._features = features
        self._factor = factor
        self._steps = 0

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        import torch

        if call.step.index >= int(call.step.total * self._factor):
            return forward(call)
        self._steps += 1
        states = []
        for feature in self._features:
            feature = rows_for(feature, call.rows).to(call.sample.dtype)
            states.append(torch.cat([feature] * len(call.batches)) if len(call.batches) > 1 else feature)
        kwargs = dict(call.kwargs)
        before = kwargs.get("down_intrablock_additional_residuals")
        if before is not None:
            states = [a + b for a, b in zip(before, states)]
        else:
            states = [s.clone() for s in states]
        kwargs["down_intrablock_additional_residuals"] = states
        return forward(call.replace(kwargs=kwargs))

    def end(self) -> dict[str, int]:
        return {"steps": self._steps}


# --- tiny models for examples and tests ---------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def tiny_adapter_handles() -> dict[str, Any]:
    """A tiny SD model whose UNet takes adapter features (cross-attention block, then a plain
    last block), with the tiny SD VAE, CLIP and scheduler: ``model``, ``clip``, ``vae``,
    ``conditioning``, ``unet``, ``pipe`` (the tiny SD pipeline the parts come from)."""
    import torch
    from dagfusion.model import ModelHandle
    from dagfusion.nodes.diffusion.data import SchedulerSpec
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.testing import models as tiny
    from diffusers import UNet2DConditionModel

    parts = tiny.sd_handles()
    pipe = tiny._cached_pipeline("sd", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8,
        ).eval()
    scheduler = SchedulerSpec(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    model = ModelHandle.from_module(unet, scheduler=scheduler, vae_scale_factor=2, info={"source": "tiny adapter sd"})
    return {"model": model, "clip": parts["clip"], "vae": parts["vae"], "unet": unet, "pipe": pipe,
            "conditioning": encode_prompt(parts["clip"], "a tiny red fox", "")}


@functools.lru_cache(maxsize=2)
def tiny_adapter(in_channels: int = 3) -> AdapterHandle:
    """A T2I-Adapter for :func:`tiny_adapter_handles`' UNet (random weights from a fixed seed)."""
    import torch
    from diffusers import T2IAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module = T2IAdapter(in_channels=in_channels, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
                            adapter_type="full_adapter").eval()
    module.requires_grad_(False)
    return AdapterHandle.from_module(module, source="tiny adapter")


# --- load and save --------------------------------------------------------------------------------


def load_module(path: Path, *, dtype: str, device: str) -> Any:
    """The ``T2IAdapter`` at ``path`` (a diffusers folder, or a single file written by
    :func:`save_single_file`), in eval mode on ``device``.

    :raises ValueError: a file that is not safetensors or carries no adapter config.
    """
    from dagfusion.nodes.diffusion.loading import torch_dtype
    from diffusers import T2IAdapter

    dt = torch_dtype(dtype)
    if path.is_dir():
        folder = path / "adapter" if (path / "adapter" / "config.json").is_file() else path
        config = folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"expected a diffusers T2I-Adapter folder (config.json and safetensors) at {path}")
        with open(config, encoding="utf-8") as fh:
            name = json.load(fh).get("_class_name")
        if name != "T2IAdapter":
            raise ValueError(f"{config} describes a {name}, not a T2IAdapter")
        if not any(folder.glob("*.safetensors")):
            raise ValueError(f"{folder} holds no .safetensors weights (pickle weights are never read here)")
        module = T2IAdapter.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, torch_dtype=dt)
        return module.to(device).eval()
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a T2I-Adapter folder or a .safetensors file, got {path.name}")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path.name} carries no T2I-Adapter config in its metadata (written by SaveT2IAdapter); "
                         "give a diffusers adapter folder instead")
    module = T2IAdapter.from_config(json.loads(metadata[METADATA_KEY])["config"])
    module.load_state_dict(load_file(str(path)), strict=True)
    return module.to(device=device, dtype=dt).eval()


def load_adapter(path: Path, *, dtype: str = "fp32", device: str = "cpu") -> AdapterHandle:
    """A handle over the adapter at ``path`` through the shared model cache."""
    from dagfusion.fingerprint import fingerprint_path, new_hasher
    from dagfusion.model import ComponentRef, default_cache

    path = Path(path).resolve()
    content = fingerprint_path(path)
    key = ("t2i-adapter", str(path), content, dtype, device)
    h = new_hasher()
    h.update(f"{content}:{dtype}:{device}".encode())
    ref = ComponentRef(key, "adapter", lambda: {"adapter": load_module(path, dtype=dtype, device=device)},
                       h.hexdigest(), default_cache())
    module = ref.get()
    info = {"source": str(path), "fingerprint": ref.fingerprint, "device": device, "dtype": dtype,
            **AdapterHandle.describe(module.config)}
    return AdapterHandle(ref, info)


def save_single_file(handle: AdapterHandle, path: Path) -> Path:
    """One safetensors file with the adapter's config and provenance in the metadata."""
    from safetensors.torch import save_file

    module = handle.module
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path), metadata={
        METADATA_KEY: json.dumps({"config": _plain(config), "source": str(handle.info.get("source", "")),
                                  "fingerprint": handle.fingerprint}, sort_keys=True),
    })  # one metadata entry: safetensors writes several in no fixed order
    return path


# --- nodes ----------------------------------------------------------------------------------------


def _load_example(single: bool) -> Any:
    def make(folder: Any) -> dict[str, Any]:
        handle = tiny_adapter()
        if single:
            return {"path": str(save_single_file(handle, folder / "adapter.safetensors")), "device": "cpu", "dtype": "fp32"}
        handle.module.save_pretrained(str(folder / "adapter"), safe_serialization=True)
        return {"path": str(folder / "adapter"), "device": "cpu", "dtype": "fp32"}

    return make


@node(
    "dagfusion.structure.LoadT2IAdapter",
    version="1.0.0",
    category="structure/adapter",
    inputs=[
        Input("path", PATH, description="A diffusers T2IAdapter folder, or a .safetensors file written by SaveT2IAdapter."),
        Input("device", STRING, "auto", choices=("auto", "cpu", "cuda", "mps"), description="Where to compute ('auto': the settings' device)."),
        Input("dtype", STRING, "auto", choices=("auto", "fp32", "fp16", "bf16"), description="Weight precision ('auto': fp16 on a GPU, fp32 on the CPU)."),
    ],
    outputs=[Output("adapter", T2I_ADAPTER, "The adapter, with what it was built for.")],
    examples=[_load_example(False), _load_example(True)],
    ui={"color": _COLOR},
)
def load_t2i_adapter(ctx: RunContext, path: str, device: str, dtype: str) -> AdapterHandle:
    """Load a T2I-Adapter offline, safetensors only (from_pretrained with local files only, or a
    single file with its config in the metadata)."""
    from dagfusion.nodes.diffusion.loaders import placement

    source = ctx.settings.check_tree_readable(ctx.input_path(path))
    device, dtype = placement(ctx, device, dtype)
    try:
        return load_adapter(source, dtype=dtype, device=device)
    except (ValueError, FileNotFoundError) as error:
        raise NodeInputError("path", str(error)) from None


def _apply_example(**settings: Any) -> Any:
    def make() -> dict[str, Any]:
        import torch

        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
        return {"model": tiny_adapter_handles()["model"], "adapter": tiny_adapter(), "image": image, **settings}

    return make


@node(
    "dagfusion.structure.ApplyT2IAdapter",
    version="1.0.0",
    category="structure/adapter",
    inputs=[
        Input("model", MODEL, link_only=True, description="The UNet model the adapter feeds (a new handle is returned)."),
        Input("adapter", T2I_ADAPTER, link_only=True, description="A T2I-Adapter built for this model's UNet."),
        *MAP_INPUTS,
        Input("strength", FLOAT, 1.0, min=0.0, max=10.0, description="Scale of the features (adapter_conditioning_scale)."),
        Input("conditioning_factor", FLOAT, 1.0, min=0.0, max=1.0,
              description="Fraction of the steps that get the features (adapter_conditioning_factor; 1 = all)."),
    ],
    outputs=[Output("model", MODEL, "The model with the adapter applied while sampling.")],
    examples=[_apply_example(), _apply_example(strength=0.6, conditioning_factor=0.5)],
    ui={"color": _COLOR},
)
def apply_t2i_adapter(ctx: RunContext, model: Any, adapter: AdapterHandle, image: Any, depth: Any, normal: Any,
                      mask: Any, control: Any, strength: float, conditioning_factor: float) -> Any:
    """Add a T2I-Adapter's features (computed once per run from the control map) to the UNet's
    encoder on every step, as StableDiffusionAdapterPipeline does (guidance halves, scale, and the
    SDXL pipeline's adapter_conditioning_factor). Maps are stacked like ApplyControlNet's.
    """
    fits(model, adapter)
    maps = {"image": image, "depth": depth, "normal": normal, "mask": mask, "control": control}
    tensor = control_from_inputs(ctx, maps, adapter.conditioning_channels)
    warn_if_cached(ctx, model, "T2I-Adapter")
    return model.with_patch(AdapterPatch(adapter, tensor, strength=strength, conditioning_factor=conditioning_factor,
                                         max_pixels=int(ctx.settings.max_image_pixels)))


def _new_example(channels: int) -> Any:
    def make() -> dict[str, Any]:
        return {"model": tiny_adapter_handles()["model"], "conditioning_channels": channels, "num_res_blocks": 1, "seed": 2}

    return make


@node(
    "dagfusion.structure.AdapterNew",
    version="1.0.0",
    category="structure/adapter",
    inputs=[
        Input("model", MODEL, link_only=True, description="The UNet model the adapter will feed."),
        Input("conditioning_channels", INT, 3, min=1, max=64, description="Channels of the control maps it takes."),
        Input("num_res_blocks", INT, 2, min=1, max=8, description="Residual blocks per feature level."),
        Input("adapter_type", STRING, "full_adapter", choices=ADAPTER_TYPES, description="diffusers' adapter layout."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds the initial weights."),
    ],
    outputs=[Output("adapter", T2I_ADAPTER, "A new, untrained adapter whose features match the UNet's blocks.")],
    examples=[_new_example(3), _new_example(5)],
    ui={"color": _COLOR},
)
def adapter_new(ctx: RunContext, model: Any, conditioning_channels: int, num_res_blocks: int, adapter_type: str,
                seed: int) -> AdapterHandle:
    """Build a fresh T2I-Adapter for a model: channels = the UNet's block_out_channels, downscale
    factor = the VAE's scale factor, for training with TrainT2IAdapter."""
    import torch
    from dagfusion.fingerprint import fingerprint
    from diffusers import T2IAdapter

    unet = model.denoiser
    config = getattr(unet, "config", None)
    channels = [int(c) for c in config.get("block_out_channels", ())] if config is not None else []
    info = {"channels": channels, "downscale_factor": model.vae_scale_factor, "adapter_type": adapter_type}
    problems = fit_problems(info, unet, model.vae_scale_factor)
    if problems or not channels:
        raise NodeInputError("model", "no T2I-Adapter layout fits this model: " + "; ".join(problems or ["no UNet"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        module = T2IAdapter(in_channels=conditioning_channels, channels=channels, num_res_blocks=num_res_blocks,
                            downscale_factor=model.vae_scale_factor, adapter_type=adapter_type)
    param = next(unet.parameters())
    if param.dtype != next(module.parameters()).dtype:
        module = module.to(dtype=param.dtype)
    module = module.to(param.device).eval()
    module.requires_grad_(False)
    fp = "new:" + str(fingerprint({"model": model.ref.fingerprint, "channels": conditioning_channels,
                                   "blocks": num_res_blocks, "type": adapter_type, "seed": seed}))
    return AdapterHandle.from_module(module, source=f"new for {model.info.get('source', '?')}", fingerprint=fp)


@node(
    "dagfusion.structure.SaveT2IAdapter",
    version="1.0.0",
    category="structure/adapter",
    inputs=[
        Input("adapter", T2I_ADAPTER, link_only=True, description="The adapter to write."),
        Input("filename", STRING, "t2i_adapter", description="Name inside the run's output folder (a folder, or a .safetensors file)."),
        Input("format", STRING, "diffusers", choices=("diffusers", "safetensors"),
              description="'diffusers': a folder for T2IAdapter.from_pretrained; 'safetensors': one file with the config in its metadata."),
    ],
    outputs=[Output("path", STRING, "Where it was written.")],
    pure=False,
    output_node=True,
    examples=[lambda: {"adapter": tiny_adapter(), "filename": "adapter/tiny.safetensors", "format": "safetensors"},
              lambda: {"adapter": tiny_adapter(), "filename": "adapter/tiny", "format": "diffusers"}],
    ui={"color": _COLOR},
)
def save_t2i_adapter(ctx: RunContext, adapter: AdapterHandle, filename: str, format: str) -> str:
    """Write a T2I-Adapter as a diffusers folder or one safetensors file (config in the metadata);
    LoadT2IAdapter reads either back exactly."""
    if format == "safetensors":
        if not filename.endswith(".safetensors"):
            raise NodeInputError("filename", f"a single file needs a name ending in .safetensors, got {filename!r}")
        return str(save_single_file(adapter, ctx.output_path(filename)))
    if filename.endswith(".safetensors"):
        raise NodeInputError("filename", f"format 'diffusers' writes a folder; {filename!r} names a file")
    folder = ctx.output_path(filename)
    folder.mkdir(parents=True, exist_ok=True)
    adapter.module.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


NODES = (load_t2i_adapter, apply_t2i_adapter, adapter_new, save_t2i_adapter)
"""The T2I-Adapter nodes, in palette order."""
