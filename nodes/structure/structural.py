"""Latent structural diffusion as nodes (HyperHuman, Liu et al., ICLR 2024).

One denoiser generates an image together with its depth map and surface normals: a UNet whose
trunk is shared and whose first and last layers are replicated per target (the model:
:mod:`~dagfusion.nodes.structure.structural_model`; training data and objective:
:mod:`~dagfusion.nodes.structure.structural_data`; the file format:
:mod:`~dagfusion.nodes.structure.structural_io`; the handle:
:mod:`~dagfusion.nodes.structure.structural_handle`). The full description is ``docs/structural.md``.

Node ids:

- ``dagfusion.structure.StructuralFromUNet`` — MODEL (an SD-layout UNet) → STRUCTURAL_MODEL;
- ``dagfusion.structure.StructuralAsModel`` / ``dagfusion.structure.StructuralFromModel`` — the
  STRUCTURAL_MODEL as a MODEL for ``dagfusion.train.Train``, and the trained MODEL back;
- ``dagfusion.structure.StructuralData`` — a shapes dataset with depth, normals and layouts as training data;
- ``dagfusion.structure.StructuralImages`` — renders, depth and normal maps as pictures (for ``TrainVAE``);
- ``dagfusion.structure.StructuralLoss`` — the joint, per-target weighted objective;
- ``dagfusion.structure.SampleStructural`` — IMAGE, DEPTH and NORMAL from text (and a layout);
- ``dagfusion.structure.SaveStructural`` / ``dagfusion.structure.LoadStructural``.

The sampler family of the model is :class:`~dagfusion.nodes.structure.structural_family.StructuralFamily`,
registered by the pack's ``register_denoiser_families`` hook.
"""

from __future__ import annotations

import functools
from typing import Any

from dagfusion import (
    BOOLEAN,
    DICT,
    FLOAT,
    INT,
    PATH,
    SEED,
    STRING,
    Input,
    NodeInputError,
    Output,
    RunContext,
    node,
    union,
)
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.structure.structural_handle import StructuralHandle
from dagfusion.nodes.structure.types import (
    DEPTH,
    LAYOUT,
    NORMAL,
    OBJECT_MASK,
    STRUCTURAL_MODEL,
)

_COLOR = "#9575cd"
_DTYPES = ("auto", "fp32", "fp16", "bf16")
_DEVICES = ("auto", "cpu", "cuda", "mps")


def register_denoiser_families(register: Any) -> None:
    """The structural model's sampler family: ``register(StructuralFamily())`` (for the pack's
    ``register_denoiser_families`` hook)."""
    from dagfusion.nodes.structure.structural_family import StructuralFamily

    register(StructuralFamily())


# --- examples -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def tiny_structural(layout_channels: int = 0) -> StructuralHandle:
    """A structural handle over the tiny SD UNet (node examples and tests; built once per setting)."""
    from dagfusion.testing import models as tiny

    return structural_from_unet(tiny.sd_handles()["model"], ("rgb", "depth", "normal"), layout_channels)


def structural_from_unet(model: Any, targets: tuple[str, ...], layout_channels: int) -> StructuralHandle:
    """A :class:`~dagfusion.nodes.structure.structural_handle.StructuralHandle` built from ``model``'s
    UNet (copied; the input handle is unchanged), with the model's scheduler and VAE factor.

    :raises ValueError: the model carries patches (they are for the UNet, not its copy).
    """
    from dagfusion.fingerprint import fingerprint
    from dagfusion.model import unwrap_compiled
    from dagfusion.nodes.structure.structural_model import StructuralUNet

    if model.patches:
        names = ", ".join(type(p).__name__ for p in model.patches)
        raise ValueError(f"expected a model without patches, got one with {names}; build the structural model first")
    module = StructuralUNet(unwrap_compiled(model.denoiser), targets, layout_channels).eval().requires_grad_(False)
    identity = fingerprint({"structural_from": fingerprint(model), "targets": list(targets), "layout_channels": layout_channels})
    return StructuralHandle.wrap(
        module, fingerprint=f"structural:{identity}", scheduler=model.scheduler, vae_scale_factor=model.vae_scale_factor,
        info={"source": f"structural {model.info.get('source', '?')}", "device": model.device}, offload=model.offload,
    )


def _from_unet_example(layout: bool) -> Any:
    def build() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        return {"model": tiny.sd_handles()["model"], "targets": "rgb, depth, normal", "layout": layout, "layout_channels": 2}

    return build


# --- building -----------------------------------------------------------------------------------


@node(
    "dagfusion.structure.StructuralFromUNet",
    version="1.0.0",
    category="structure/structural",
    inputs=[
        Input("model", "MODEL", link_only=True,
              description="A Stable-Diffusion-layout UNet model; it is copied into the trunk and every branch (unchanged)."),
        Input("targets", STRING, "rgb, depth, normal",
              description="Targets denoised jointly, in channel order, comma-separated (SampleStructural needs rgb and depth)."),
        Input("layout", BOOLEAN, False,
              description="Condition every branch on a layout raster concatenated at its input convolution."),
        Input("layout_channels", INT, 2, min=1, max=64,
              description="Channels of the layout raster (one per object; extra objects share the last)."),
    ],
    outputs=[Output("model", STRUCTURAL_MODEL, "The joint denoiser: shared trunk, one expert branch per target.")],
    examples=[_from_unet_example(False), _from_unet_example(True)],
    ui={"color": _COLOR},
)
def structural_from_unet_node(ctx: RunContext, model: Any, targets: str, layout: bool, layout_channels: int) -> Any:
    """Build a latent structural diffusion model from a UNet: conv_in, the first down block, the
    last up block and conv_out are replicated per target (copies of the UNet's), the rest is a
    shared trunk that averages the branches' features. With every target given the same latent
    it predicts exactly what the UNet predicts; layout input channels start at zero.
    """
    from dagfusion.nodes.structure.structural_model import parse_targets

    try:
        names = parse_targets(targets)
    except ValueError as exc:
        raise NodeInputError("targets", str(exc)) from None
    try:
        return structural_from_unet(model, names, layout_channels if layout else 0)
    except (TypeError, ValueError) as exc:
        raise NodeInputError("model", str(exc)) from None


def _as_model_example() -> dict[str, Any]:
    return {"model": tiny_structural(0)}


@node(
    "dagfusion.structure.StructuralAsModel",
    version="1.0.0",
    category="structure/structural",
    inputs=[Input("model", STRUCTURAL_MODEL, link_only=True, description="A structural model.")],
    outputs=[Output("model", "MODEL", "The same weights as a MODEL handle (for dagfusion.train.Train).")],
    examples=[_as_model_example],
    ui={"color": _COLOR},
)
def structural_as_model(ctx: RunContext, model: Any) -> Any:
    """Pass a structural model to nodes that take a MODEL — the Train node above all: its sampler
    family stacks the targets along the channels. Nothing is copied."""
    return model.as_model()


def _from_model_example() -> dict[str, Any]:
    return {"model": tiny_structural(0).as_model()}


@node(
    "dagfusion.structure.StructuralFromModel",
    version="1.0.0",
    category="structure/structural",
    inputs=[Input("model", "MODEL", link_only=True,
                  description="A MODEL whose denoiser is a structural model (e.g. dagfusion.train.Train's output).")],
    outputs=[Output("model", STRUCTURAL_MODEL, "The same weights, scheduler and patches as a structural model.")],
    examples=[_from_model_example],
    ui={"color": _COLOR},
)
def structural_from_model(ctx: RunContext, model: Any) -> Any:
    """Take a trained structural model back from a MODEL socket (the inverse of StructuralAsModel)."""
    try:
        return StructuralHandle.from_model(model)
    except TypeError as exc:
        raise NodeInputError("model", f"expected a model whose denoiser is a StructuralUNet: {exc}") from None


# --- training -----------------------------------------------------------------------------------


def _data_example(normals: str, layout: str) -> Any:
    def build() -> dict[str, Any]:
        from dagfusion.nodes.shapes.dataset import ShapesDataset

        return {"dataset": ShapesDataset(objects=2, resolution=32, seed=0), "normals": normals, "layout": layout}

    return build


@node(
    "dagfusion.structure.StructuralData",
    version="1.0.0",
    category="structure/structural",
    inputs=[
        Input("dataset", "SHAPES_DATASET", link_only=True, description="Shapes-world renders (two-object scenes recommended)."),
        Input("normals", STRING, "auto", choices=("auto", "depth"),
              description="'auto': the renderer's normals when it provides them, else from the depth map; 'depth': always from the depth map."),
        Input("layout", STRING, "boxes", choices=("boxes", "masks", "none"),
              description="Layout raster: each object's bounding box, its mask, or none."),
        Input("layout_channels", INT, 2, min=1, max=64, description="Channels of the layout raster (match the model's)."),
        Input("normal_strength", FLOAT, 1.0, exclusive_min=0.0, max=100.0,
              description="For normals from depth: height of a unit depth step, in image widths."),
    ],
    outputs=[Output("data", "TRAINING_DATA", "Images with captions; depth, normals and layouts ride along for the structural loss.")],
    examples=[_data_example("auto", "boxes"), _data_example("depth", "masks")],
    ui={"color": _COLOR},
)
def structural_data(ctx: RunContext, dataset: Any, normals: str, layout: str, layout_channels: int,
                    normal_strength: float) -> Any:
    """Training data for latent structural diffusion: each shapes render with its depth map
    (flipped to 1 = nearest), surface normals and a layout raster, for dagfusion.train.Train with
    dagfusion.structure.StructuralLoss."""
    from dagfusion.nodes.structure.structural_data import StructuralShapesData

    return StructuralShapesData(dataset, normals=normals, layout=layout, layout_channels=layout_channels,
                                normal_strength=normal_strength)


def _images_example() -> dict[str, Any]:
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return {"dataset": ShapesDataset(objects=2, resolution=32, seed=0), "targets": "rgb, depth, normal"}


@node(
    "dagfusion.structure.StructuralImages",
    version="1.0.0",
    category="structure/structural",
    inputs=[
        Input("dataset", "SHAPES_DATASET", link_only=True, description="Shapes-world renders."),
        Input("targets", STRING, "rgb, depth, normal", description="Which pictures to interleave, comma-separated."),
        Input("normals", STRING, "auto", choices=("auto", "depth"),
              description="'auto': the renderer's normals when it provides them, else from the depth map; 'depth': always from the depth map."),
        Input("normal_strength", FLOAT, 1.0, exclusive_min=0.0, max=100.0,
              description="For normals from depth: height of a unit depth step, in image widths."),
    ],
    outputs=[Output("data", "TRAINING_DATA", "Pictures of every target, interleaved (sample i: target i mod T of scene i // T).")],
    examples=[_images_example],
    ui={"color": _COLOR},
)
def structural_images(ctx: RunContext, dataset: Any, targets: str, normals: str, normal_strength: float) -> Any:
    """Renders, depth maps (grey) and normal maps ((n + 1) / 2) as pictures, interleaved: data for
    dagfusion.train.TrainVAE to fine-tune the shared VAE on every target of latent structural
    diffusion."""
    from dagfusion.nodes.structure.structural_data import StructuralImages
    from dagfusion.nodes.structure.structural_model import parse_targets

    try:
        return StructuralImages(dataset, parse_targets(targets), normals=normals, normal_strength=normal_strength)
    except ValueError as exc:
        raise NodeInputError("targets", str(exc)) from None


def _loss_example(with_vae: bool) -> Any:
    def build() -> dict[str, Any]:
        from dagfusion.nodes.training.objectives import (
            EpsilonObjective,
            RectifiedFlowObjective,
        )
        from dagfusion.testing import models as tiny

        if with_vae:
            return {"objective": EpsilonObjective(), "vae": tiny.sd_handles()["vae"], "weights": "rgb=1, depth=0.5, normal=0.5"}
        return {"objective": RectifiedFlowObjective(), "weights": "", "layout_dropout": 0.5}

    return build


@node(
    "dagfusion.structure.StructuralLoss",
    version="1.0.0",
    category="structure/structural",
    inputs=[
        Input("objective", "OBJECTIVE", link_only=True,
              description="How each target is noised and what is predicted: dagfusion.train.Epsilon, VPrediction or RectifiedFlow."),
        Input("vae", "VAE", optional=True, link_only=True,
              description="The VAE that encodes depth and normal maps (the Train node's VAE); absent: pixel space."),
        Input("weights", STRING, "rgb=1, depth=1, normal=1",
              description="Loss weight per target, 'name=weight' comma-separated; unnamed targets weigh 1."),
        Input("layout_dropout", FLOAT, 0.1, min=0.0, max=1.0,
              description="Probability of training a sample with its layout raster zeroed (so sampling works without one)."),
    ],
    outputs=[Output("objective", "OBJECTIVE", "The joint loss: the weighted sum of the targets' losses.")],
    examples=[_loss_example(True), _loss_example(False)],
    ui={"color": _COLOR},
)
def structural_loss(ctx: RunContext, objective: Any, vae: Any, weights: str, layout_dropout: float) -> Any:
    """The training objective of latent structural diffusion, for dagfusion.train.Train on
    StructuralData: every target (image, depth, normals) encoded by the shared VAE, noised at
    the same timestep with its own noise, and the weighted sum of the targets' losses minimised."""
    from dagfusion.nodes.structure.structural_data import (
        StructuralObjective,
        parse_weights,
    )

    try:
        parsed = parse_weights(weights)
    except ValueError as exc:
        raise NodeInputError("weights", str(exc)) from None
    try:
        return StructuralObjective(objective, tuple(parsed.items()), layout_dropout, vae)
    except TypeError as exc:
        raise NodeInputError("objective", str(exc)) from None


# --- sampling -----------------------------------------------------------------------------------


def layout_raster(layout: Any, size: tuple[int, int], channels: int, rows: int) -> Any:
    """A ``LAYOUT`` (rasterised by boxes) or an ``OBJECT_MASK``-like tensor as a ``(R, channels, H, W)``
    raster at ``size``; ``R`` is 1 or ``rows`` (a layout's rows per prompt).

    :raises ValueError: a tensor of the wrong shape or channels, or rows that do not fit.
    """
    import torch
    from dagfusion.nodes.structure.structural_data import box_raster

    if hasattr(layout, "rows"):
        raster = box_raster(layout, size, channels)
    else:
        raster = torch.as_tensor(layout).float()
        if raster.ndim != 4:
            raise ValueError(f"expected a layout raster (B, {channels}, H, W), got shape {tuple(raster.shape)}")
        if raster.shape[1] != channels:
            raise ValueError(f"expected a layout raster with {channels} channels (the model's), got {raster.shape[1]}")
    if raster.shape[0] not in (1, rows):
        raise ValueError(f"expected a layout of 1 or {rows} rows (one per prompt), got {raster.shape[0]}")
    return raster.clamp(0, 1)


def sample_structural(
    ctx: RunContext | None,
    model: Any,
    conditioning: Any,
    vae: Any,
    *,
    width: int,
    height: int,
    batch_size: int = 1,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 5.0,
    sampler: str = "default",
    layout: Any = None,
    require_depth: bool = True,
) -> dict[str, Any]:
    """Sample every target jointly with the shared sampler and decode each with the VAE.

    Returns ``image`` (B, 3, H, W) in [0, 1], ``depth`` (B, 1, H, W) in [0, 1] (1 = nearest),
    ``normal`` (B, 3, H, W) unit vectors (derived from the depth map when the model has no normal
    target), ``latent`` (the stacked latents) and ``report``. ``B`` = prompts × ``batch_size``.
    With ``require_depth=False`` a model without a depth target (an RGB-only baseline built the
    same way) samples too, its ``depth`` and ``normal`` ``None``.

    :raises NodeInputError: a model without an rgb target (or, with ``require_depth``, a depth
        target), a VAE of other latent channels, or a layout the model cannot take.
    """
    import torch
    from dagfusion.nodes.diffusion.data import Conditioning, Latent
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.diffusion.vae import decode
    from dagfusion.nodes.structure.structural_data import (
        maps_from_images,
        normals_from_depth,
    )
    from dagfusion.nodes.structure.structural_model import StructuralFamily

    module = model.module
    missing = [t for t in (("rgb", "depth") if require_depth else ("rgb",)) if t not in module.targets]
    if missing:
        wanted = "rgb and depth targets" if require_depth else "an rgb target"
        raise NodeInputError("model", f"expected a structural model with {wanted}, got targets {list(module.targets)}")
    vae_channels = int(getattr(vae.module.config, "latent_channels", -1))
    if vae_channels != module.latent_channels:
        raise NodeInputError("vae", f"expected a VAE with {module.latent_channels}-channel latents (the model's), got {vae_channels}")
    prompts = conditioning.batch_size
    rows = prompts * batch_size
    positive = dict(conditioning.positive)
    if layout is not None:
        if module.layout_channels == 0:
            raise NodeInputError("layout", "expected no layout: this structural model was built without layout conditioning")
        try:
            positive["layout"] = layout_raster(layout, (height, width), module.layout_channels, prompts)
        except ValueError as exc:
            raise NodeInputError("layout", str(exc)) from None
    cond = Conditioning(conditioning.kind, positive, conditioning.negative, conditioning.meta)
    try:
        shape = StructuralFamily().latent_shape(module, rows, height, width, model.vae_scale_factor)
    except ValueError as exc:
        raise NodeInputError("width", str(exc)) from None
    latents, report = run_sampling(
        model, cond, Latent(torch.zeros(shape), {"size": [width, height], "batch_size": rows}),
        sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed, ctx=ctx,
    )
    parts = module.split(latents.samples)
    maps = {name: maps_from_images(name, decode(vae, Latent(part))) for name, part in parts.items()
            if name in ("rgb", "depth", "normal")}
    depth, normal = maps.get("depth"), maps.get("normal")
    if normal is None and depth is not None:
        normal = normals_from_depth(depth)
    return {"image": maps["rgb"], "depth": depth, "normal": normal, "latent": latents, "report": report}


def _sample_example(layout: bool) -> Any:
    def build() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        parts = tiny.sd_handles()
        inputs = {"model": tiny_structural(2 if layout else 0), "conditioning": parts["conditioning"],
                  "vae": parts["vae"], "width": 32, "height": 32, "steps": 2, "seed": 1, "guidance_scale": 1.0}
        if layout:
            from dagfusion.nodes.structure.data import Layout, LayoutObject

            inputs["layout"] = Layout(((LayoutObject((0.1, 0.1, 0.5, 0.5), "red circle"),),), size=(32, 32))
            inputs["sampler"] = "euler"
        return inputs

    return build


@node(
    "dagfusion.structure.SampleStructural",
    version="1.0.0",
    category="structure/structural",
    inputs=[
        Input("model", STRUCTURAL_MODEL, link_only=True, description="The joint RGB + depth + normal denoiser."),
        Input("conditioning", "CONDITIONING", link_only=True, description="Text conditioning (with a negative for guidance > 1)."),
        Input("vae", "VAE", link_only=True, description="The shared VAE that decodes every target."),
        Input("width", INT, 512, min=8, max=16384, ui={"step": 8}, description="Image width in pixels."),
        Input("height", INT, 512, min=8, max=16384, ui={"step": 8}, description="Image height in pixels."),
        Input("batch_size", INT, 1, min=1, max=4096, description="Images per prompt."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the noise (every target's, from one CPU generator)."),
        Input("steps", INT, 20, min=1, max=1000, description="Denoising steps (one timestep for all targets)."),
        Input("guidance_scale", FLOAT, 5.0, min=0.0, max=100.0,
              description="Classifier-free guidance on the text, applied to every target; 1 or less disables it."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES,
              description="Sampler; 'default' uses the model's scheduler."),
        Input("layout", union(LAYOUT, OBJECT_MASK), optional=True, link_only=True,
              description="Where the objects go: a LAYOUT (rasterised by boxes) or a raster (B, L, H, W); for layout-conditioned models."),
    ],
    outputs=[
        Output("image", "IMAGE", "The images (B, 3, H, W) in [0, 1]."),
        Output("depth", DEPTH, "Their depth maps (B, 1, H, W), 1 = nearest."),
        Output("normal", NORMAL, "Their surface normals (B, 3, H, W), unit vectors."),
        Output("latent", "LATENT", "The stacked latents of every target (B, T·C, h, w)."),
        Output("report", "RUN_REPORT", "What the sampling run computed, per step."),
    ],
    examples=[_sample_example(False), _sample_example(True)],
    ui={"color": _COLOR},
)
def sample_structural_node(
    ctx: RunContext, model: Any, conditioning: Any, vae: Any, width: int, height: int, batch_size: int, seed: int,
    steps: int, guidance_scale: float, sampler: str, layout: Any,
) -> dict[str, Any]:
    """Generate images with their depth maps and surface normals jointly (latent structural
    diffusion): the shared sampler denoises all targets at one timestep with classifier-free
    guidance, step hooks, progress and cancellation, then the VAE decodes each target."""
    return sample_structural(ctx, model, conditioning, vae, width=width, height=height, batch_size=batch_size,
                             seed=seed, steps=steps, guidance_scale=guidance_scale, sampler=sampler, layout=layout)


# --- files --------------------------------------------------------------------------------------


def _save_example() -> dict[str, Any]:
    return {"model": tiny_structural(2), "folder": "structural/tiny", "dtype": "fp16"}


@node(
    "dagfusion.structure.SaveStructural",
    version="1.0.0",
    category="structure/structural",
    inputs=[
        Input("model", STRUCTURAL_MODEL, link_only=True, description="The structural model to save (without patches)."),
        Input("folder", STRING, "structural", description="Folder inside the run's output folder."),
        Input("dtype", STRING, "keep", choices=("keep", "fp32", "fp16", "bf16"), description="Precision of the saved weights."),
    ],
    outputs=[
        Output("path", STRING, "The folder written (config.json and structural.safetensors)."),
        Output("bytes", INT, "Size of the weights file in bytes."),
    ],
    pure=False,
    output_node=True,
    examples=[_save_example],
    ui={"color": _COLOR},
)
def save_structural(ctx: RunContext, model: Any, folder: str, dtype: str) -> dict[str, Any]:
    """Save a structural model as safetensors weights with a JSON config (format
    dagfusion.structural v1: targets, channels, the UNet config, the scheduler; the config also in
    the file's metadata). LoadStructural reads it back."""
    from dagfusion.nodes.structure import structural_io

    if not folder.strip() or folder.endswith(".safetensors"):
        raise NodeInputError("folder", f"expected a folder name such as 'structural', got {folder!r}")
    try:
        path = structural_io.save(model, ctx.output_path(folder), dtype)
    except ValueError as exc:
        raise NodeInputError("model", str(exc)) from None
    return {"path": str(path), "bytes": (path / structural_io.WEIGHTS).stat().st_size}


def _load_example(folder: Any) -> dict[str, Any]:
    from dagfusion.nodes.structure import structural_io

    path = structural_io.save(tiny_structural(2), folder / "tiny-structural")
    return {"path": str(path), "device": "cpu", "dtype": "auto"}


def saved_report(document: dict[str, Any]) -> dict[str, Any]:
    """What the load nodes report of a saved model's config: format, targets, channels, dtype, size."""
    return {k: document.get(k) for k in ("format", "format_version", "targets", "latent_channels", "layout_channels",
                                         "dtype", "parameters", "vae_scale_factor")}


@node(
    "dagfusion.structure.LoadStructural",
    version="1.0.0",
    category="structure/structural",
    inputs=[
        Input("path", PATH, description="A folder written by SaveStructural (or its structural.safetensors), under the allowed read folders."),
        Input("device", STRING, "auto", choices=_DEVICES, description="Where to compute; 'auto' takes the settings' device."),
        Input("dtype", STRING, "auto", choices=_DTYPES, description="Weight precision; 'auto' keeps the stored one."),
    ],
    outputs=[
        Output("model", STRUCTURAL_MODEL, "The structural model with its saved scheduler."),
        Output("report", DICT, "The saved config: targets, channels, dtype, parameters."),
    ],
    examples=[_load_example],
    ui={"color": _COLOR},
)
def load_structural(ctx: RunContext, path: str, device: str, dtype: str) -> dict[str, Any]:
    """Load a structural model saved by SaveStructural (safetensors only; the weights must match
    the config exactly)."""
    from dagfusion.nodes.diffusion.loading import resolve_device
    from dagfusion.nodes.structure import structural_io

    file = ctx.settings.check_tree_readable(ctx.input_path(path))
    try:
        document, _ = structural_io.read_config(file)
        handle = structural_io.load(file, device=resolve_device(device, ctx.device), dtype=dtype)
    except ValueError as exc:
        raise NodeInputError("path", str(exc)) from None
    return {"model": handle, "report": saved_report(document)}


EMBEDDED: dict[str, str] = {
    "shapes-structural": "the two-object joint RGB + depth + normal model of the shapes world (64 px, box layout of "
                         "2 channels; workflows/train_structure_shapes.yaml); sample it with shapes-sd-two-objects' "
                         "text encoder and VAE",
}
"""The structural models shipped with dagfusion: name → what it is (a folder of that name in
``nodes/structure/models``)."""


def embedded_structural_folder(name: str) -> Any:
    """The shipped folder of the embedded structural model ``name``.

    :raises ValueError: ``name`` is not one, or its weights are not in this installation.
    """
    from pathlib import Path

    from dagfusion.nodes.structure import structural_io

    if name not in EMBEDDED:
        raise ValueError(f"expected an embedded structural model in {sorted(EMBEDDED)}, got {name!r}")
    folder = Path(__file__).with_name("models") / name
    if not (folder / structural_io.WEIGHTS).is_file():
        raise ValueError(f"the embedded structural model {name!r} is not in this installation ({folder} holds no weights); "
                         "train it with workflows/train_structure_shapes.yaml and copy the saved folder there")
    return folder


@node(
    "dagfusion.structure.LoadEmbeddedStructural",
    version="1.0.0",
    category="structure/structural",
    inputs=[
        Input("name", STRING, "shapes-structural", choices=tuple(EMBEDDED), description="; ".join(f"'{k}': {v}" for k, v in EMBEDDED.items())),
        Input("device", STRING, "auto", choices=_DEVICES, description="Where to compute; 'auto' takes the settings' device."),
        Input("dtype", STRING, "auto", choices=_DTYPES, description="Weight precision; 'auto' is fp32 on the CPU, the stored fp16 elsewhere."),
    ],
    outputs=[
        Output("model", STRUCTURAL_MODEL, "The shipped structural model with its scheduler."),
        Output("report", DICT, "Its config: targets, channels, dtype, parameters."),
    ],
    examples=[{"name": "shapes-structural", "device": "cpu", "dtype": "fp32"}],
    ui={"color": _COLOR},
)
def load_embedded_structural(ctx: RunContext, name: str, device: str, dtype: str) -> dict[str, Any]:
    """Load a structural model shipped with dagfusion (package data, offline; no read permission needed)."""
    from dagfusion.nodes.diffusion.loading import resolve_device
    from dagfusion.nodes.structure import structural_io

    try:
        folder = embedded_structural_folder(name)
    except ValueError as exc:
        raise NodeInputError("name", str(exc)) from None
    device = resolve_device(device, ctx.device)
    if dtype == "auto":
        dtype = "fp32" if str(device).startswith("cpu") else "auto"
    document, _ = structural_io.read_config(folder)
    handle = structural_io.load(folder, device=device, dtype=dtype)
    return {"model": handle, "report": saved_report(document)}


__all__ = ["NODES", "StructuralHandle", "layout_raster", "register_denoiser_families", "sample_structural",
           "structural_from_unet", "tiny_structural"]

NODES = (
    structural_from_unet_node,
    structural_as_model,
    structural_from_model,
    structural_data,
    structural_images,
    structural_loss,
    sample_structural_node,
    save_structural,
    load_structural,
    load_embedded_structural,
)
"""The latent structural diffusion nodes, in palette order."""
