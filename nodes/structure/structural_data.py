"""Training latent structural diffusion on the shared training loop: data and objective.

Data (:class:`StructuralShapesData`, a ``TRAINING_DATA`` source). Each sample is a shapes-world
render with its caption, plus, in the ``raw`` part of the loop's examples, a
:class:`StructuralBatch`: the depth map (the pack's ``DEPTH`` convention, 1 = nearest: the
renderer's "1 = far" distance is flipped, :func:`depth_from_far`), the surface normals (``NORMAL`` convention) — the
renderer's own when it provides them (``Rendered.normal``), otherwise derived from the depth map
by finite differences (:func:`normals_from_depth`) — and a layout raster (:func:`box_raster`:
channel ``k`` is object ``k``'s filled bounding box, from the renderer's ``Rendered.layout`` when
it is a :class:`~dagfusion.nodes.structure.data.Layout`, else from the object masks).

Objective (:class:`StructuralObjective`, an ``OBJECTIVE``). The loop encodes the RGB image with
the Train node's VAE (``batch.x0``); the objective encodes depth and normals with its own VAE —
the same, shared VAE — as 3-channel pictures (:func:`target_images`), stacks the targets' latents
in the model's target order, draws one timestep per row and independent noise for every target
from the loop's generator, noises them with its base objective (epsilon, v-prediction or
rectified flow) and returns ``Σ_k w_k · MSE(prediction_k, target_k)`` (each term reported as
``loss_<target>``). The layout raster is dropped (zeroed) per row with probability
``layout_dropout`` so the model also works without a layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from dagfusion.nodes.training.data import Examples, TrainingData
from dagfusion.nodes.training.objectives import (
    ModelCall,
    Objective,
    TrainBatch,
    TrainStep,
    mse,
)

NORMAL_SOURCES = ("auto", "depth")
"""Where a data source takes normals from: the renderer's when it has them (``auto``), or always
finite differences of the depth map (``depth``)."""

LAYOUT_SOURCES = ("boxes", "masks", "none")
"""What a data source gives as the layout raster: object bounding boxes, the object masks, nothing."""


# --- map conversions ------------------------------------------------------------------------------


def normals_from_depth(depth: Any, strength: float = 1.0) -> Any:
    """Unit normals ``(B, 3, H, W)`` (``NORMAL`` convention) of the surface a depth map describes.

    The depth map ``(B, 1, H, W)`` (``DEPTH`` convention, 1 = nearest) is read as a height field
    towards the viewer, ``strength`` × the image width for a depth step of 1; the normal of
    ``z(x, y)`` is ``(−∂z/∂x, −∂z/∂y, 1)`` normalised, with central differences (one-sided at the
    border) and ``y`` pointing up (image rows grow downwards). A flat map gives ``(0, 0, 1)``.
    (The convention of the pack's ``NormalsFromDepth`` node.)

    :raises ValueError: ``depth`` is not ``(B, 1, H, W)``.
    """
    import torch

    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"expected depth maps (B, 1, H, W), got shape {tuple(depth.shape)}")
    z = depth.float() * (float(strength) * depth.shape[-1])
    padded = torch.nn.functional.pad(z, (1, 1, 1, 1), mode="replicate")
    dz_dx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    dz_drow = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    # replicate padding halves the difference at the border: make it one-sided there
    if z.shape[-1] > 1:
        dz_dx[..., 0] *= 2
        dz_dx[..., -1] *= 2
    if z.shape[-2] > 1:
        dz_drow[..., 0, :] *= 2
        dz_drow[..., -1, :] *= 2
    normal = torch.cat([-dz_dx, dz_drow, torch.ones_like(z)], dim=1)
    return normal / normal.norm(dim=1, keepdim=True)


def rendered_normals(rendered: Any, depth: Any, strength: float = 1.0) -> Any:
    """A render's normals: the renderer's own (``Rendered.normal``) when it made them, else the
    normals of its ``DEPTH`` map ``depth`` (:func:`normals_from_depth` with ``strength``)."""
    import torch

    normal = getattr(rendered, "normal", None)
    if normal is None:
        return normals_from_depth(depth, strength)
    return torch.as_tensor(normal).float()


def depth_from_far(depth: Any, near: float = 0.0) -> Any:
    """A shapes render's depth (a distance, background at 1 = far) in the ``DEPTH`` convention
    (1 = nearest): ``clamp((1 − d) / (1 − near), 0, 1)`` — ``near = 0`` for the flat style, the
    solid style's nearest distance (0.5) for solids, as the shapes pack converts them."""
    return ((1.0 - depth.float()) / (1.0 - float(near))).clamp(0, 1)


def render_near(dataset: Any) -> float:
    """The nearest distance a dataset's renderer draws at: 0 for flat renders, the solid
    renderer's ``SOLID_NEAR`` for ``style="solid"``."""
    if getattr(dataset, "style", "flat") != "solid":
        return 0.0
    from dagfusion.nodes.shapes.solid import SOLID_NEAR

    return float(SOLID_NEAR)


def target_images(name: str, value: Any) -> Any:
    """A target's map as a 3-channel picture in ``[0, 1]`` for the VAE: ``rgb`` as is, ``depth``
    repeated in three channels, ``normal`` as ``(n + 1) / 2``.

    :raises ValueError: an unknown target, or a map of the wrong shape for it.
    """
    expected = {"rgb": 3, "depth": 1, "normal": 3}
    if name not in expected:
        raise ValueError(f"expected a target in {sorted(expected)}, got {name!r}")
    if value.ndim != 4 or value.shape[1] != expected[name]:
        raise ValueError(f"expected {name} maps (B, {expected[name]}, H, W), got shape {tuple(value.shape)}")
    value = value.float()
    if name == "depth":
        return value.clamp(0, 1).expand(-1, 3, -1, -1)
    if name == "normal":
        return ((value + 1) / 2).clamp(0, 1)
    return value.clamp(0, 1)


def maps_from_images(name: str, images: Any) -> Any:
    """Inverse of :func:`target_images` for decoded pictures: ``rgb`` as is, ``depth`` the mean
    of the channels ``(B, 1, H, W)``, ``normal`` unit vectors ``2·x − 1`` normalised (a zero
    vector becomes ``(0, 0, 1)``)."""
    import torch

    images = images.float()
    if name == "depth":
        return images.mean(dim=1, keepdim=True).clamp(0, 1)
    if name == "normal":
        n = images * 2 - 1
        norm = n.norm(dim=1, keepdim=True)
        facing = torch.zeros_like(n)
        facing[:, 2] = 1.0
        return torch.where(norm > 1e-6, n / norm.clamp_min(1e-6), facing)
    if name == "rgb":
        return images.clamp(0, 1)
    raise ValueError(f"expected a target in ['depth', 'normal', 'rgb'], got {name!r}")


def box_raster(layout: Any, size: tuple[int, int], channels: int) -> Any:
    """A layout's boxes as a raster ``(B, channels, H, W)``: channel ``k`` is 1 inside object
    ``k``'s box (pixel centres), in the layout's object order; objects beyond ``channels`` are
    merged into the last channel, missing ones leave their channel at 0.

    :raises ValueError: ``channels`` < 1.
    """
    import torch

    if channels < 1:
        raise ValueError(f"a layout raster needs at least one channel, got {channels}")
    height, width = size
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    out = torch.zeros(len(layout.rows), channels, height, width)
    for i, row in enumerate(layout.rows):
        for k, obj in enumerate(row):
            x0, y0, x1, y1 = obj.box
            inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
            channel = min(k, channels - 1)
            out[i, channel] = torch.maximum(out[i, channel], inside.float())
    return out


def boxes_from_masks(masks: Any, threshold: float = 0.5) -> Any:
    """Each mask channel replaced by its filled bounding box (``(B, K, H, W)``; empty stays 0)."""
    import torch

    on = masks > threshold
    rows = on.any(dim=-1)  # (B, K, H)
    cols = on.any(dim=-2)  # (B, K, W)
    h_idx = torch.arange(masks.shape[-2])
    w_idx = torch.arange(masks.shape[-1])
    big = masks.shape[-2] + masks.shape[-1]
    top = torch.where(rows, h_idx, big).amin(dim=-1)
    bottom = torch.where(rows, h_idx, -1).amax(dim=-1)
    left = torch.where(cols, w_idx, big).amin(dim=-1)
    right = torch.where(cols, w_idx, -1).amax(dim=-1)
    in_rows = (h_idx[None, None, :] >= top[..., None]) & (h_idx[None, None, :] <= bottom[..., None])
    in_cols = (w_idx[None, None, :] >= left[..., None]) & (w_idx[None, None, :] <= right[..., None])
    return (in_rows[..., :, None] & in_cols[..., None, :]).float()


def fit_channels(raster: Any, channels: int) -> Any:
    """``raster`` with exactly ``channels`` channels: extra ones merged (maximum) into the last, missing ones zero."""
    import torch

    k = raster.shape[1]
    if k == channels:
        return raster
    if k < channels:
        pad = raster.new_zeros((raster.shape[0], channels - k, *raster.shape[-2:]))
        return torch.cat([raster, pad], dim=1)
    head = raster[:, : channels - 1]
    tail = raster[:, channels - 1 :].amax(dim=1, keepdim=True)
    return torch.cat([head, tail], dim=1)


# --- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StructuralBatch:
    """The structure of a batch of training images (the ``raw`` part of the loop's examples).

    Attributes:
        depth: ``(B, 1, H, W)`` in ``[0, 1]``, 1 = nearest.
        normal: ``(B, 3, H, W)`` unit vectors (x right, y up, z towards the viewer).
        layout: ``(B, K, H, W)`` layout raster in ``[0, 1]``, or ``None``.
        source: The dataset's own batch.
    """

    depth: Any
    normal: Any
    layout: Any = None
    source: Any = field(default=None, compare=False)

    def target(self, name: str, images: Any) -> Any:
        """The map of target ``name`` (``rgb`` is ``images``)."""
        if name == "rgb":
            return images
        if name == "depth":
            return self.depth
        if name == "normal":
            return self.normal
        raise ValueError(f"the structural data has no {name!r} target; it has ['rgb', 'depth', 'normal']")


class StructuralShapesData(TrainingData):
    """Shapes-world renders with depth, normals and a layout raster (see the module docstring).

    :param dataset: A ``ShapesDataset`` (or any object whose ``batch(first, count)`` returns
        ``rendered`` with ``image``, ``mask`` and ``depth`` — and optionally ``normal`` and
        ``layout`` — and ``captions``).
    :param normals: ``"auto"`` (the renderer's normals when it has them) or ``"depth"``.
    :param layout: ``"boxes"``, ``"masks"`` or ``"none"`` (:data:`LAYOUT_SOURCES`).
    :param layout_channels: Channels of the layout raster (objects beyond it share the last one).
    :param normal_strength: Height of a unit depth step in image widths, for derived normals.
    """

    def __init__(self, dataset: Any, *, normals: str = "auto", layout: str = "boxes", layout_channels: int = 2,
                 normal_strength: float = 1.0) -> None:
        if normals not in NORMAL_SOURCES:
            raise ValueError(f"expected normals in {list(NORMAL_SOURCES)}, got {normals!r}")
        if layout not in LAYOUT_SOURCES:
            raise ValueError(f"expected layout in {list(LAYOUT_SOURCES)}, got {layout!r}")
        if layout != "none" and layout_channels < 1:
            raise ValueError(f"layout_channels must be at least 1 with a layout, got {layout_channels}")
        if not callable(getattr(dataset, "batch", None)):
            raise TypeError(f"expected a dataset with batch(first_index, count), got {type(dataset).__name__}")
        self.dataset = dataset
        self.normals = normals
        self.layout = layout
        self.layout_channels = int(layout_channels) if layout != "none" else 0
        self.normal_strength = float(normal_strength)

    def structure(self, batch: Any) -> StructuralBatch:
        """The :class:`StructuralBatch` of one of the dataset's batches."""
        rendered = batch.rendered
        depth = depth_from_far(rendered.depth, render_near(self.dataset))
        if self.normals == "auto":
            normal = rendered_normals(rendered, depth, self.normal_strength)
        else:
            normal = normals_from_depth(depth, self.normal_strength)
        raster = None
        if self.layout != "none":
            size = tuple(depth.shape[-2:])
            given = getattr(rendered, "layout", None)
            if self.layout == "boxes" and given is not None and hasattr(given, "rows"):
                raster = box_raster(given, size, self.layout_channels)
            elif self.layout == "boxes":
                raster = fit_channels(boxes_from_masks(rendered.mask), self.layout_channels)
            else:
                raster = fit_channels(rendered.mask.float(), self.layout_channels)
        return StructuralBatch(depth, normal, raster, batch)

    def examples(self, first: int, count: int) -> Examples:
        batch = self.dataset.batch(first, count)
        images = batch.rendered.image
        return Examples(images, tuple(str(c) for c in batch.captions), self.structure(batch))

    def describe(self) -> dict[str, Any]:
        describe = getattr(self.dataset, "describe", None)
        return {"source": "structural", "dataset": describe() if callable(describe) else type(self.dataset).__name__,
                "normals": self.normals, "layout": self.layout, "layout_channels": self.layout_channels,
                "normal_strength": self.normal_strength}

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import fingerprint

        inner = fingerprint(self.dataset)
        if inner is None:
            raise TypeError(f"{type(self.dataset).__name__} cannot be fingerprinted; give it __dagfusion_fingerprint__")
        return "structural-data:" + json.dumps({"dataset": inner, **{k: v for k, v in self.describe().items() if k != "dataset"}},
                                               sort_keys=True)


# --- objective ------------------------------------------------------------------------------------


def parse_weights(text: str) -> dict[str, float]:
    """``"rgb=1, depth=0.5"`` as ``{"rgb": 1.0, "depth": 0.5}`` (empty text: ``{}``).

    :raises ValueError: a malformed entry or a negative weight.
    """
    weights: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected entries like 'depth=0.5', got {entry!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"expected a number for {name.strip()!r}, got {value.strip()!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"expected a weight of 0 or more for {name.strip()!r}, got {value.strip()!r}")
        weights[name.strip()] = weight
    return weights


@dataclass(frozen=True, eq=False)
class StructuralObjective(Objective):
    """The joint denoising loss of latent structural diffusion (see the module docstring).

    Attributes:
        base: The per-target noising and target: an epsilon / v-prediction
            (``NoiseScheduleObjective``) or rectified-flow objective.
        weights: Loss weight per target name; targets not named weigh 1.
        layout_dropout: Probability of training a row without its layout raster.
        vae: The VAE encoding depth and normals (the Train node's, shared), or ``None`` when the
            model works on pixels in ``[-1, 1]``.
    """

    base: Any
    weights: tuple[tuple[str, float], ...] = ()
    layout_dropout: float = 0.1
    vae: Any = None

    name = "structural"

    def __post_init__(self) -> None:
        from dagfusion.nodes.training.objectives import (
            NoiseScheduleObjective,
            RectifiedFlowObjective,
        )

        if not isinstance(self.base, (NoiseScheduleObjective, RectifiedFlowObjective)):
            raise TypeError(
                "expected an epsilon, v-prediction or rectified-flow objective as the base, "
                f"got {type(self.base).__name__}"
            )
        if not 0.0 <= self.layout_dropout <= 1.0:
            raise ValueError(f"layout_dropout must be in [0, 1], got {self.layout_dropout}")
        object.__setattr__(self, "weights", tuple(sorted((str(k), float(v)) for k, v in dict(self.weights).items())))

    def weight(self, target: str) -> float:
        return dict(self.weights).get(target, 1.0)

    def describe(self) -> dict[str, Any]:
        from dagfusion.fingerprint import fingerprint

        return {
            "objective": self.name, "base": self.base.describe(), "weights": dict(self.weights),
            "layout_dropout": self.layout_dropout, "vae": None if self.vae is None else fingerprint(self.vae),
        }

    def sampling_scheduler(self, base: Any) -> Any:
        return self.base.sampling_scheduler(base)

    def _encode(self, images: Any, generator: Any, device: Any) -> Any:
        import torch

        if self.vae is None:
            return images.to(device=device, dtype=torch.float32) * 2 - 1
        from dagfusion.nodes.diffusion.vae import from_vae_space

        vae = self.vae
        module = vae.module
        with vae.patched(module), torch.no_grad():
            param = next(module.parameters())
            x = images.to(device=param.device, dtype=param.dtype) * 2 - 1
            z = module.encode(x).latent_dist.sample(generator=generator)
            return from_vae_space(module, z).to(device=device, dtype=torch.float32)

    def latents(self, module: Any, batch: TrainBatch, generator: Any) -> Any:
        """The stacked clean latents ``(B, T·C, h, w)`` of the batch, in the model's target order.

        :raises ValueError: the data has no structure, or shapes and channels disagree.
        """
        import torch

        raw = getattr(batch.examples, "raw", None)
        if not isinstance(raw, StructuralBatch):
            raise ValueError(  # noqa: TRY004 - the data, not an argument, is of the wrong kind
                "the structural objective needs depth and normals with every image: train on "
                "dagfusion.structure.StructuralData, not on plain images"
            )
        unknown = sorted(set(dict(self.weights)) - set(module.targets))
        if unknown:
            raise ValueError(f"loss weights name targets {unknown} the model does not have; it has {list(module.targets)}")
        x0 = batch.x0
        if x0.shape[1] != module.latent_channels:
            raise ValueError(
                f"the training loop's latents have {x0.shape[1]} channels but the model's targets have "
                f"{module.latent_channels}; give the Train node and the objective the same VAE"
            )
        parts = []
        for name in module.targets:
            if name == "rgb":
                part = x0
            else:
                part = self._encode(target_images(name, raw.target(name, batch.examples.images)), generator, x0.device)
                if tuple(part.shape) != tuple(x0.shape):
                    raise ValueError(
                        f"the {name} latents have shape {tuple(part.shape)} but the image latents {tuple(x0.shape)}; "
                        "encode every target with the same VAE"
                    )
            parts.append(part)
        return torch.cat(parts, dim=1)

    def loss(self, model_call: ModelCall, batch: TrainBatch, step: TrainStep, generator: Any) -> tuple[Any, dict[str, float]]:
        import torch
        from dagfusion.model import unwrap_compiled
        from dagfusion.nodes.training.objectives import RectifiedFlowObjective

        module = unwrap_compiled(model_call.module)
        if not hasattr(module, "targets") or not hasattr(module, "split"):
            raise ValueError(f"the structural objective trains a StructuralUNet, got {type(module).__name__}")
        x0 = self.latents(module, batch, generator)
        noise, t = self.base.draw(x0, generator)
        noisy = self.base.noisy(x0, noise, t)
        target = self.base.target(x0, noise, t)
        timesteps = t * self.base.train_timesteps if isinstance(self.base, RectifiedFlowObjective) else t
        inputs: dict[str, Any] = {}
        if module.layout_channels > 0:
            raw = batch.examples.raw
            raster = raw.layout
            rows = x0.shape[0]
            if raster is None:
                raster = torch.zeros(rows, module.layout_channels, *raw.depth.shape[-2:])
            if raster.shape[1] != module.layout_channels:
                raise ValueError(
                    f"the data's layout raster has {raster.shape[1]} channels but the model takes "
                    f"{module.layout_channels}; set the data's layout_channels to match"
                )
            if self.layout_dropout > 0:
                keep = (torch.rand((rows,), generator=generator) >= self.layout_dropout).float()
                raster = raster * keep.view(-1, 1, 1, 1)
            inputs["layout"] = raster.to(device=x0.device, dtype=torch.float32)
        prediction = model_call(noisy, timesteps.to(x0.device), **inputs)
        predicted, wanted = module.split(prediction), module.split(target)
        total = prediction.new_zeros(())
        logs: dict[str, float] = {}
        for name in module.targets:
            term = mse(predicted[name], wanted[name])
            logs[f"loss_{name}"] = float(term.detach())
            total = total + self.weight(name) * term
        return total, logs


class StructuralImages(TrainingData):
    """Renders, depth maps and normal maps as pictures, interleaved: sample ``i`` is the picture of
    target ``targets[i mod T]`` of the structural data's sample ``i // T`` (:func:`target_images`:
    depth as grey, normals as ``(n + 1) / 2``). A source for ``dagfusion.train.TrainVAE``, so that
    the shared VAE learns to reconstruct every target's pictures (its scaling factor is then
    measured over the mix, one factor for all targets).

    :raises ValueError: unknown or repeated targets.
    """

    def __init__(self, dataset: Any, targets: tuple[str, ...] = ("rgb", "depth", "normal"), *, normals: str = "auto",
                 normal_strength: float = 1.0) -> None:
        unknown = [t for t in targets if t not in ("rgb", "depth", "normal")]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"expected distinct targets among ['rgb', 'depth', 'normal'], got {list(targets)}")
        self.targets = tuple(targets)
        self.data = StructuralShapesData(dataset, normals=normals, layout="none", normal_strength=normal_strength)

    def examples(self, first: int, count: int) -> Examples:
        import torch

        per = len(self.targets)
        start, stop = first // per, (first + count - 1) // per
        source = self.data.examples(start, stop - start + 1)
        pictures, captions = [], []
        for index in range(first, first + count):
            row = index // per - start
            name = self.targets[index % per]
            value = source.raw.target(name, source.images)[row : row + 1]
            pictures.append(target_images(name, value))
            captions.append(source.captions[row])
        return Examples(torch.cat(pictures), tuple(captions))

    def describe(self) -> dict[str, Any]:
        return {"source": "structural-images", "targets": list(self.targets), "data": self.data.describe()}

    def __dagfusion_fingerprint__(self) -> str:
        return "structural-images:" + json.dumps({"targets": list(self.targets), "data": self.data.__dagfusion_fingerprint__()},
                                                 sort_keys=True)
