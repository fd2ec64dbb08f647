"""The latent structural diffusion model: one UNet denoising several targets jointly.

Latent structural diffusion (HyperHuman, Liu et al., ICLR 2024) denoises the latents of an
image and of its structure — depth and surface normals, each encoded by the same VAE as a
3-channel picture — together, at one timestep, under one text (and optionally layout)
conditioning. :class:`StructuralUNet` is built from a Stable-Diffusion-layout diffusers
``UNet2DConditionModel``:

- **per target** (an "expert branch", one per entry of ``targets``): ``conv_in``,
  ``down_blocks[0]``, ``up_blocks[-1]``, ``conv_norm_out`` and ``conv_out`` — copies of the
  UNet's, so every branch starts as the UNet itself;
- **shared** (the trunk): the time/class/added embeddings, ``down_blocks[1:]``, the mid block
  and ``up_blocks[:-1]``.

Fusion. Each branch runs its ``conv_in`` and first down block on its own latent. The skip
features the last up block reads (the output of ``conv_in`` and of each resnet of the first down
block) stay in their branch. Everything that enters the trunk — the first down block's output
and the skip features of the trunk's up blocks that come from it (the downsampler's output) —
is the **mean over the branches**. The trunk's output is given to every branch's last up block,
together with that branch's own skips, and each branch's output convolution predicts its
target's noise.

Invariant of the construction. With branches copied from a UNet and all targets given the same
noisy latent, every branch computes the same features, their mean is that feature, and each
target's prediction equals the original UNet's prediction for that latent (up to float
rounding of the mean). Different latents per target mix in the trunk.

Tensors. The model takes and returns **stacked** latents ``(B, T·C, h, w)``: target ``k`` in
channels ``k·C … k·C + C − 1``, in the order of ``targets`` (:meth:`StructuralUNet.split` and
:meth:`StructuralUNet.stack` convert to and from ``{target: (B, C, h, w)}``). The stacked form is
what lets the shared sampler and the training loop drive it like any other denoiser: schedulers
step element-wise and classifier-free guidance combines element-wise, so the targets share the
timestep, the noise schedule and the guidance.

Layout conditioning (optional, ``layout_channels = L > 0``): a raster ``(B, L, H, W)`` in
``[0, 1]`` (any resolution; resized to the latent's by area averaging, or bilinearly when
smaller) is concatenated to every branch's input before its ``conv_in``, whose ``L`` extra input
channels start at zero — so a fresh model ignores the layout until trained. An absent layout is
an all-zero raster (what layout dropout trains for).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from dagfusion.model import Family, Prepared, class_names, expand, unwrap_compiled
from dagfusion.nodes.structure.structural_family import StructuralFamily, register_denoiser_families
from dagfusion.nodes.structure.structural_handle import StructuralHandle

__all__ = [
    "DEFAULT_TARGETS", "KNOWN_TARGETS", "StructuralBranch", "StructuralConfig", "StructuralFamily", "StructuralHandle",
    "StructuralUNet", "check_sd_layout", "parse_targets", "register_denoiser_families",
    "structural_from_config",
]

DEFAULT_TARGETS: tuple[str, ...] = ("rgb", "depth", "normal")
"""The targets of latent structural diffusion: the image, its depth map and its surface normals."""

KNOWN_TARGETS: tuple[str, ...] = DEFAULT_TARGETS
"""Targets the data, the objective and the sampling node know how to make and decode."""


def parse_targets(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"rgb, depth, normal"`` (or a sequence) as a tuple of distinct, non-empty target names.

    :raises ValueError: empty, repeated or badly formed names.
    """
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    names = [n for n in names if n]
    if not names:
        raise ValueError("expected at least one target, such as 'rgb, depth, normal', got none")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"expected distinct targets, got {repeated} more than once")
    bad = [n for n in names if not n.replace("_", "").isalnum()]
    if bad:
        raise ValueError(f"expected target names of letters, digits and '_', got {bad}")
    return tuple(names)


@dataclass(frozen=True)
class StructuralConfig:
    """The configuration of a :class:`StructuralUNet` (also its ``config`` attribute, as diffusers
    models have one).

    Attributes:
        targets: The targets, in channel order.
        latent_channels: Channels ``C`` of one target's latent.
        layout_channels: Channels ``L`` of the layout raster (0: no layout conditioning).
        unet: The config of the UNet it was built from (plain JSON data).
    """

    targets: tuple[str, ...]
    latent_channels: int
    layout_channels: int
    unet: Mapping[str, Any]

    @property
    def in_channels(self) -> int:
        """Channels of the stacked noisy latents: ``T·C``."""
        return len(self.targets) * self.latent_channels

    @property
    def out_channels(self) -> int:
        """Channels of the stacked prediction: ``T·C``."""
        return self.in_channels

    @property
    def sample_size(self) -> Any:
        return self.unet.get("sample_size")

    def to_dict(self) -> dict[str, Any]:
        return {"targets": list(self.targets), "latent_channels": self.latent_channels,
                "layout_channels": self.layout_channels, "unet": _plain(self.unet)}


def _plain(value: Any) -> Any:
    """JSON-compatible copy of a diffusers config value."""
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


class StructuralBranch(torch.nn.Module):
    """One target's expert layers: ``conv_in``, the first down block, the last up block and the
    output convolution (with its normalisation and activation)."""

    def __init__(self, conv_in: Any, down: Any, up: Any, norm_out: Any, act: Any, conv_out: Any) -> None:
        super().__init__()
        self.conv_in = conv_in
        self.down = down
        self.up = up
        self.conv_norm_out = norm_out
        self.conv_act = act
        self.conv_out = conv_out


def _widen_conv_in(conv: Any, extra: int) -> Any:
    """A copy of ``conv`` taking ``extra`` more input channels, whose weights start at zero."""
    conv = copy.deepcopy(conv)
    if extra == 0:
        return conv
    wider = torch.nn.Conv2d(
        conv.in_channels + extra, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, : conv.in_channels] = conv.weight
        if conv.bias is not None:
            wider.bias.copy_(conv.bias)
    return wider


def check_sd_layout(unet: Any) -> None:
    """:raises TypeError: ``unet`` is not a diffusers ``UNet2DConditionModel``.
    :raises ValueError: it cannot be split into branches (no down/up blocks, or an ``image_hint``
        addition embedding that changes the input channels)."""
    inner = unwrap_compiled(unet)
    if "UNet2DConditionModel" not in class_names(inner):
        raise TypeError(f"expected a diffusers UNet2DConditionModel (Stable Diffusion layout), got {type(inner).__name__}")
    if len(inner.down_blocks) < 1 or len(inner.up_blocks) < 1:
        raise ValueError("the UNet needs at least one down block and one up block to have expert branches")
    if getattr(inner.config, "addition_embed_type", None) == "image_hint":
        raise ValueError("UNets with an 'image_hint' addition embedding are not supported")
    first_up = len(inner.up_blocks[-1].resnets)
    available = 1 + len(inner.down_blocks[0].resnets) + (1 if inner.down_blocks[0].downsamplers else 0)
    if first_up > available:
        raise ValueError(
            f"the UNet's last up block reads {first_up} skip features but conv_in and the first down block "
            f"give only {available}; this layout cannot be split into branches"
        )


class StructuralUNet(torch.nn.Module):
    """A UNet with a shared trunk and one expert branch per target; see the module docstring.

    :param unet: A ``UNet2DConditionModel``; it is copied (never changed): the trunk is a copy of
        it and every branch a copy of its ``conv_in``, ``down_blocks[0]``, ``up_blocks[-1]``,
        ``conv_norm_out`` and ``conv_out``.
    :param targets: Target names, in channel order (``("rgb", "depth", "normal")``).
    :param layout_channels: Channels of the layout raster concatenated at every branch's
        ``conv_in`` (their weights start at zero); 0 for none.
    :raises TypeError, ValueError: see :func:`check_sd_layout`; bad targets or channels.
    """

    def __init__(self, unet: Any, targets: Sequence[str] = DEFAULT_TARGETS, layout_channels: int = 0) -> None:
        super().__init__()
        check_sd_layout(unet)
        targets = parse_targets(targets)
        if layout_channels < 0:
            raise ValueError(f"layout_channels must be 0 or more, got {layout_channels}")
        source = unwrap_compiled(unet)
        channels = int(source.config.in_channels)
        if int(source.config.out_channels) != channels:
            raise ValueError(
                f"expected a UNet predicting its input's channels, got in_channels {channels} and "
                f"out_channels {source.config.out_channels} (inpainting and learned-variance UNets are not supported)"
            )
        self._config = StructuralConfig(targets, channels, int(layout_channels), _plain(dict(source.config)))
        self.branches = torch.nn.ModuleDict({
            name: StructuralBranch(
                _widen_conv_in(source.conv_in, int(layout_channels)),
                copy.deepcopy(source.down_blocks[0]),
                copy.deepcopy(source.up_blocks[-1]),
                copy.deepcopy(source.conv_norm_out),
                copy.deepcopy(source.conv_act),
                copy.deepcopy(source.conv_out),
            )
            for name in targets
        })
        trunk = copy.deepcopy(source)
        # The branch layers live in ``branches``; the trunk keeps placeholders without parameters.
        trunk.conv_in = torch.nn.Identity()
        trunk.down_blocks[0] = torch.nn.Identity()
        trunk.up_blocks[-1] = torch.nn.Identity()
        trunk.conv_norm_out = None
        trunk.conv_out = torch.nn.Identity()
        self.trunk = trunk
        self._own_skips = len(source.up_blocks[-1].resnets)

    # --- description -------------------------------------------------------------------------

    @property
    def config(self) -> StructuralConfig:
        """The model's :class:`StructuralConfig`."""
        return self._config

    @property
    def targets(self) -> tuple[str, ...]:
        return self._config.targets

    @property
    def latent_channels(self) -> int:
        """Channels ``C`` of one target's latent."""
        return self._config.latent_channels

    @property
    def layout_channels(self) -> int:
        return self._config.layout_channels

    @property
    def dtype(self) -> Any:
        return next(self.parameters()).dtype

    def split(self, stacked: Any) -> dict[str, Any]:
        """``{target: (B, C, h, w)}`` from stacked latents ``(B, T·C, h, w)`` (views, no copy).

        :raises ValueError: the channels are not ``T·C``.
        """
        expected = self._config.in_channels
        if stacked.ndim != 4 or stacked.shape[1] != expected:
            raise ValueError(
                f"expected stacked latents (B, {expected}, h, w) for targets {list(self.targets)} of "
                f"{self.latent_channels} channels each, got shape {tuple(stacked.shape)}"
            )
        return dict(zip(self.targets, stacked.split(self.latent_channels, dim=1)))

    def stack(self, parts: Mapping[str, Any]) -> Any:
        """Stacked latents ``(B, T·C, h, w)`` from ``{target: (B, C, h, w)}`` (every target needed).

        :raises ValueError: a target is missing or extra, or the parts' shapes differ.
        """
        missing = [t for t in self.targets if t not in parts]
        extra = sorted(set(parts) - set(self.targets))
        if missing or extra:
            raise ValueError(f"expected latents for targets {list(self.targets)}, missing {missing}, extra {extra}")
        shapes = {t: tuple(parts[t].shape) for t in self.targets}
        if len(set(shapes.values())) != 1 or next(iter(shapes.values()))[1] != self.latent_channels:
            raise ValueError(f"expected every target's latent to be (B, {self.latent_channels}, h, w), got {shapes}")
        return torch.cat([parts[t] for t in self.targets], dim=1)

    # --- forward -----------------------------------------------------------------------------

    def _fit_layout(self, layout: Any, like: Any) -> Any:
        rows, (height, width) = like.shape[0], like.shape[-2:]
        if self.layout_channels == 0:
            if layout is not None:
                raise ValueError("this structural model has no layout conditioning (layout_channels 0), but a layout was given")
            return None
        if layout is None:
            return like.new_zeros((rows, self.layout_channels, height, width))
        if layout.ndim != 4 or layout.shape[1] != self.layout_channels:
            raise ValueError(
                f"expected a layout raster (B, {self.layout_channels}, H, W), got shape {tuple(layout.shape)}"
            )
        if layout.shape[0] != rows:
            layout = expand(layout, rows, "layout raster")
        layout = layout.to(device=like.device, dtype=like.dtype)
        if tuple(layout.shape[-2:]) != (height, width):
            if layout.shape[-2] >= height and layout.shape[-1] >= width:
                layout = torch.nn.functional.adaptive_avg_pool2d(layout, (height, width))
            else:
                layout = torch.nn.functional.interpolate(layout, size=(height, width), mode="bilinear", align_corners=False)
        return layout

    def forward(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        layout: Any = None,
        *,
        timestep_cond: Any = None,
        class_labels: Any = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: Any = None,
        encoder_attention_mask: Any = None,
        return_dict: bool = True,
    ) -> Any:
        """Predict every target's noise (or v, or flow) from stacked noisy latents.

        :param sample: Stacked noisy latents ``(B, T·C, h, w)`` (see the module docstring).
        :param timestep: One timestep for all targets: a scalar or one per row.
        :param encoder_hidden_states: Text states ``(B, N, D)``.
        :param layout: Optional layout raster ``(B, L, H, W)`` (``None``: all zero).
        :returns: ``(prediction,)`` when ``return_dict`` is false, else an object with ``.sample``;
            the prediction is stacked like ``sample``.
        :raises ValueError: wrong channels or layout.
        """
        trunk = self.trunk
        parts = self.split(sample)
        raster = self._fit_layout(layout, sample)
        config = trunk.config
        up_factor = 2**trunk.num_upsamplers
        forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
        upsample_size = None
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        # shared embeddings (as UNet2DConditionModel computes them)
        t_emb = trunk.get_time_embed(sample=sample, timestep=timestep)
        emb = trunk.time_embedding(t_emb, timestep_cond)
        class_emb = trunk.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if config.class_embeddings_concat else emb + class_emb
        aug_emb = trunk.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug_emb if aug_emb is not None else emb
        if trunk.time_embed_act is not None:
            emb = trunk.time_embed_act(emb)
        encoder_hidden_states = trunk.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        cross = {
            "encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask,
            "cross_attention_kwargs": cross_attention_kwargs, "encoder_attention_mask": encoder_attention_mask,
        }

        # expert branches: conv_in and the first down block, per target
        own: dict[str, tuple[Any, ...]] = {}
        shared_skips: list[list[Any]] = []
        entering: list[Any] = []
        for name, branch in self.branches.items():
            x = parts[name]
            if config.center_input_sample:
                x = 2 * x - 1.0
            if raster is not None:
                x = torch.cat([x, raster], dim=1)
            h = branch.conv_in(x)
            skips: tuple[Any, ...] = (h,)
            h, res = self._down(branch.down, h, emb, cross)
            skips += res
            own[name] = skips[: self._own_skips]
            shared_skips.append(list(skips[self._own_skips:]))
            entering.append(h)

        # fusion: the mean over branches of everything entering the trunk
        h = torch.stack(entering).mean(dim=0)
        down_res: tuple[Any, ...] = tuple(torch.stack(group).mean(dim=0) for group in zip(*shared_skips))
        for block in trunk.down_blocks[1:]:
            h, res = self._down(block, h, emb, cross)
            down_res += res
        if trunk.mid_block is not None:
            if getattr(trunk.mid_block, "has_cross_attention", False):
                h = trunk.mid_block(h, emb, **cross)
            else:
                h = trunk.mid_block(h, emb)
        for block in trunk.up_blocks[:-1]:
            count = len(block.resnets)
            res, down_res = down_res[-count:], down_res[:-count]
            if forward_upsample_size:
                upsample_size = (down_res[-1] if down_res else own[self.targets[0]][-1]).shape[2:]
            h = self._up(block, h, emb, res, upsample_size, cross)

        # expert branches again: the last up block and the output convolution, per target
        outputs = []
        for name, branch in self.branches.items():
            y = self._up(branch.up, h, emb, own[name], None, cross)
            if branch.conv_norm_out is not None:
                y = branch.conv_act(branch.conv_norm_out(y))
            outputs.append(branch.conv_out(y))
        out = torch.cat(outputs, dim=1)
        if not return_dict:
            return (out,)
        return _Output(out)

    @staticmethod
    def _down(block: Any, h: Any, emb: Any, cross: dict[str, Any]) -> tuple[Any, tuple[Any, ...]]:
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, **cross)
        return block(hidden_states=h, temb=emb)

    @staticmethod
    def _up(block: Any, h: Any, emb: Any, res: tuple[Any, ...], size: Any, cross: dict[str, Any]) -> Any:
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size, **cross)
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)

    def __repr__(self) -> str:
        return (f"StructuralUNet(targets={list(self.targets)}, latent_channels={self.latent_channels}, "
                f"layout_channels={self.layout_channels})")


class _Output:
    """What ``forward(..., return_dict=True)`` returns: ``.sample`` like diffusers outputs."""

    __slots__ = ("sample",)

    def __init__(self, sample: Any) -> None:
        self.sample = sample

    def __getitem__(self, index: int) -> Any:
        return (self.sample,)[index]


def structural_from_config(
    unet_config: Mapping[str, Any], targets: Sequence[str] = DEFAULT_TARGETS, layout_channels: int = 0, seed: int = 0
) -> StructuralUNet:
    """A fresh :class:`StructuralUNet` from a UNet config (seeded random weights; branches copies
    of one random initialisation)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    return StructuralUNet(unet, targets, layout_channels)
