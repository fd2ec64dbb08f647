"""Training ControlNets and T2I-Adapters on the shared training loop.

Nothing here is a second loop: a ControlNet (or adapter) trains as a **trainable patch** of the
frozen model (:class:`ControlTrainPatch`, whose ``trainable_parameters()`` are the network's),
with an **objective** that knows about control maps (:class:`ControlObjective`), through
:func:`dagfusion.nodes.training.loop.train` with ``trainable="patches"`` — the loop of
``dagfusion.train.Train``, its seeding, AdamW, EMA, checkpoints and resume.

- **Data.** :class:`ControlData` is a :class:`~dagfusion.nodes.training.data.TrainingData`: images,
  captions and control maps (any channel stack: a picture, or depth + normals + masks), resized
  to the images' size. Its batches carry the maps in ``Examples.raw`` (:class:`ControlBatch`).
- **Objective.** Each step :class:`ControlObjective` draws noise and timesteps like its base
  objective (epsilon, v or flow), zeroes each row's control map with probability
  ``condition_dropout`` (so the network learns to do nothing without a map — the usual recipe),
  asks the patch on the training module for its residuals (found with
  :func:`~dagfusion.model.applied_patch`) and passes them to the frozen UNet: the usual
  noise-prediction loss, conditioned on the map.
- **Nodes.** ``dagfusion.structure.TrainControlNet`` and ``TrainT2IAdapter`` wire it: they attach
  the patch, wrap a plain objective, run the loop (checkpoints in the training work folder of the
  cache folder, resumed automatically, exactly as ``dagfusion.train.Train``) and output the
  trained network. From Python the pieces also work with
  :func:`~dagfusion.nodes.training.loop.train` directly: a model carrying a
  :class:`ControlTrainPatch`, a :class:`ControlData` source, a :class:`ControlObjective` and
  ``trainable="patches"``; the trained network is ``result.model.patches[-1].network``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dagfusion import (
    BOOLEAN,
    FLOAT,
    INT,
    LIST,
    PATH,
    SEED,
    STRING,
    Input,
    NodeInputError,
    Output,
    RunContext,
    node,
)
from dagfusion.model import ModelPatch, applied_patch
from dagfusion.nodes.diffusion.types import MODEL
from dagfusion.nodes.structure.controlnet import MAP_INPUTS
from dagfusion.nodes.structure.controlnet_maps import ControlMapError, stack_control
from dagfusion.nodes.structure.types import CONTROL_NET, T2I_ADAPTER
from dagfusion.nodes.training.data import Examples, TrainingData
from dagfusion.nodes.training.objectives import Objective, TrainBatch, TrainStep, mse
from dagfusion.nodes.training.types import OBJECTIVE, TRAINING_DATA

_COLOR = "#ff7043"
KINDS = ("controlnet", "adapter")


# --- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlBatch:
    """The raw batch of a :class:`ControlData` source.

    Attributes:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        captions: One per image.
        control: ``(B, C, H, W)`` control maps in ``[0, 1]`` (the images' size).
    """

    images: Any
    captions: tuple[str, ...]
    control: Any


class ControlData(TrainingData):
    """Images, captions and control maps, repeated: sample ``i`` is triple ``order[i mod N]`` with
    a new seeded permutation each pass (``shuffle``) or in order. Control maps of another size
    than the images are resized to it (nearest neighbour)."""

    def __init__(self, images: Any, captions: Any, control: Any, *, seed: int = 0, shuffle: bool = True) -> None:
        import torch

        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] not in (3, 4):
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        if control.ndim != 4:
            raise ValueError(f"expected control maps (B, C, H, W), got shape {tuple(control.shape)}")
        n = int(images.shape[0])
        if n == 0:
            raise ValueError("got no images")
        if len(captions) != n:
            raise ValueError(f"got {n} images but {len(captions)} captions; give one caption per image")
        if control.shape[0] not in (1, n):
            raise ValueError(f"got {n} images but {control.shape[0]} control maps; give one map per image")
        control = control.detach().float().cpu()
        if control.shape[0] == 1 and n > 1:
            control = control.expand(n, -1, -1, -1)
        if tuple(control.shape[-2:]) != tuple(images.shape[-2:]):
            control = torch.nn.functional.interpolate(control, size=tuple(images.shape[-2:]))
        self.images = images[:, :3].detach().float().cpu().contiguous()
        self.captions = tuple(str(c) for c in captions)
        self.control = control.contiguous()
        self.seed = int(seed)
        self.shuffle = bool(shuffle)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def channels(self) -> int:
        """Channels of the control maps."""
        return int(self.control.shape[1])

    def _index(self, i: int) -> int:
        import torch

        n = len(self)
        epoch, position = divmod(i, n)
        if not self.shuffle:
            return position
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 10_007 + epoch))
        return int(order[position])

    def examples(self, first: int, count: int) -> Examples:
        chosen = [self._index(first + k) for k in range(count)]
        captions = tuple(self.captions[k] for k in chosen)
        images = self.images[chosen]
        return Examples(images, captions, ControlBatch(images, captions, self.control[chosen]))

    def describe(self) -> dict[str, Any]:
        return {"source": "control", "count": len(self), "channels": self.channels, "shuffle": self.shuffle,
                "seed": self.seed}

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import fingerprint

        return "control-data:" + str(fingerprint({"images": self.images, "captions": list(self.captions),
                                                  "control": self.control, "seed": self.seed,
                                                  "shuffle": self.shuffle}))


def control_of(raw: Any) -> Any:
    """The control maps of a batch's raw data (a :class:`ControlBatch`, or anything with a
    ``control`` attribute or key).

    :raises ValueError: the data source gives no control maps.
    """
    value = raw.get("control") if isinstance(raw, dict) else getattr(raw, "control", None)
    if value is None:
        raise ValueError("training a ControlNet or adapter needs control maps in the data: use a "
                         "dagfusion.structure.ControlData source (images, captions and maps)")
    return value


# --- the trainable patch ----------------------------------------------------------------------------


class ControlTrainPatch(ModelPatch):
    """A ControlNet or T2I-Adapter riding on a frozen model for training (``trainable: patches``).

    It changes nothing while sampling (no hook: sampling with a trained network goes through
    ApplyControlNet / ApplyT2IAdapter); during training :class:`ControlObjective` asks it for the
    residuals of a batch.

    :param network: The ``ControlNetModel`` or ``T2IAdapter`` (the training loop trains a copy).
    :param kind: ``"controlnet"`` or ``"adapter"``.
    :param identity: The network's fingerprint (it goes into the patch's key).
    :param conditioning_scale: Scale of the residuals during training.
    """

    def __init__(self, network: Any, kind: str, identity: str, conditioning_scale: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"expected a kind in {list(KINDS)}, got {kind!r}")
        self.network = network
        self.kind = kind
        self.conditioning_scale = float(conditioning_scale)
        self.key = f"dagfusion.structure.train-control:{kind}:{identity}:{self.conditioning_scale}"

    def trainable_parameters(self) -> dict[str, Any]:
        """The network's parameters (``{name: Parameter}``)."""
        return dict(self.network.named_parameters())

    @property
    def channels(self) -> int:
        """Channels of the control maps the network takes."""
        config = self.network.config
        return int(config.get("conditioning_channels", config.get("in_channels", 3)))

    def residuals(self, sample: Any, timesteps: Any, inputs: dict[str, Any], control: Any) -> dict[str, Any]:
        """The UNet keyword inputs that carry the network's residuals for this batch."""
        net = self.network
        param = next(net.parameters())
        control = control.to(device=param.device, dtype=param.dtype)
        if self.kind == "adapter":
            features = net(control)
            return {"down_intrablock_additional_residuals": [f * self.conditioning_scale for f in features]}
        extra: dict[str, Any] = {}
        if inputs.get("added_cond_kwargs") is not None and net.config.get("addition_embed_type") is not None:
            extra["added_cond_kwargs"] = inputs["added_cond_kwargs"]
        in_channels = int(net.config.get("in_channels", 4))
        down, mid = net(sample[:, :in_channels].to(param.dtype), timesteps,
                        encoder_hidden_states=inputs["encoder_hidden_states"].to(param.dtype), controlnet_cond=control,
                        conditioning_scale=self.conditioning_scale, return_dict=False, **extra)
        return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}


# --- the objective ----------------------------------------------------------------------------------


def drop_conditions(control: Any, probability: float, generator: Any) -> tuple[Any, Any]:
    """``control`` with each row zeroed with ``probability`` (one draw per row from ``generator``,
    always drawn so the random stream does not depend on the probability), and the kept mask."""
    import torch

    draw = torch.rand((control.shape[0],), generator=generator)
    keep = draw >= probability
    return control * keep.to(control.dtype).view(-1, 1, 1, 1), keep


def drop_condition_groups(control: Any, groups: tuple[tuple[int, int], ...], probability: float,
                          generator: Any) -> tuple[Any, Any]:
    """``control`` with each channel group ``(first, end)`` of each row zeroed independently with
    ``probability`` (one draw per row and group from ``generator``), and the kept mask ``(rows, groups)``.

    :raises ValueError: a group reaches past the map's channels.
    """
    import torch

    channels = int(control.shape[1])
    for first, end in groups:
        if end > channels:
            raise ValueError(f"condition group {first}:{end} reaches past the control map's {channels} channels")
    keep = torch.rand((control.shape[0], len(groups)), generator=generator) >= probability
    scale = torch.ones(control.shape[0], channels, dtype=control.dtype)
    for g, (first, end) in enumerate(groups):
        scale[:, first:end] = keep[:, g:g + 1].to(control.dtype)
    return control * scale.to(control.device)[:, :, None, None], keep


def parse_condition_groups(text: str) -> tuple[tuple[int, int], ...]:
    """Channel groups from ``"depth=0:1, normal=1:4, layout=4:6"`` (names optional: ``"0:1, 1:4"``),
    sorted; ``""`` is no groups (the whole map drops at once).

    :raises ValueError: a malformed, empty or overlapping range.
    """
    groups = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        span = part.split("=", 1)[-1].strip()
        try:
            first, end = (int(x) for x in span.split(":"))
        except ValueError:
            raise ValueError(f"expected a channel range like 'depth=0:1' (first:end), got {part!r}") from None
        if not 0 <= first < end:
            raise ValueError(f"expected 0 <= first < end in a channel range, got {part!r}")
        groups.append((first, end))
    groups.sort()
    for (_, end), (first, _) in zip(groups, groups[1:]):
        if first < end:
            raise ValueError(f"channel ranges overlap: {text!r}")
    return tuple(groups)


@dataclass(frozen=True)
class ControlObjective(Objective):
    """A base objective's loss with a control map: residuals from the model's
    :class:`ControlTrainPatch` added to the frozen UNet; each map zeroed with ``condition_dropout``,
    or, with ``groups``, each channel group zeroed independently with it (a refiner trained so
    learns to work with any subset of its conditions).

    Attributes:
        base: The noise objective (epsilon, v-prediction or rectified flow).
        condition_dropout: Probability that a row's control map (or one of its groups) is zeroed.
        groups: Channel ranges ``(first, end)`` dropped independently; empty: the whole map at once.
    """

    base: Any = None
    condition_dropout: float = 0.0
    groups: tuple[tuple[int, int], ...] = ()
    name: str = field(default="control", init=False)

    def __post_init__(self) -> None:
        from dagfusion.nodes.training.objectives import NoiseScheduleObjective, RectifiedFlowObjective

        if not isinstance(self.base, (NoiseScheduleObjective, RectifiedFlowObjective)):
            raise ValueError("a control objective wraps an epsilon, v-prediction or rectified-flow objective, got "
                             f"{type(self.base).__name__}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {self.condition_dropout}")

    def _timesteps(self, t: Any) -> Any:
        from dagfusion.nodes.training.objectives import RectifiedFlowObjective

        return t * self.base.train_timesteps if isinstance(self.base, RectifiedFlowObjective) else t

    def loss(self, model_call: Any, batch: TrainBatch, step: TrainStep, generator: Any) -> tuple[Any, dict[str, float]]:
        patch = applied_patch(model_call.module, ControlTrainPatch)
        if patch is None:
            raise ValueError("the model carries no ControlNet or adapter to train: attach one with "
                             "dagfusion.structure.TrainControlNet / TrainT2IAdapter (a ControlTrainPatch)")
        x0 = batch.x0
        control = control_of(batch.examples.raw if batch.examples is not None else None)
        if control.shape[1] != patch.channels:
            raise ValueError(f"the {patch.kind} takes {patch.channels} conditioning channels, the data's control maps "
                             f"have {control.shape[1]}")
        noise, t = self.base.draw(x0, generator)
        if self.groups:
            control, keep = drop_condition_groups(control.float(), self.groups, self.condition_dropout, generator)
        else:
            control, keep = drop_conditions(control.float(), self.condition_dropout, generator)
        noisy = self.base.noisy(x0, noise, t)
        timesteps = self._timesteps(t).to(x0.device)
        with model_call.autocast():
            extra = patch.residuals(noisy, timesteps, model_call.inputs, control.to(x0.device))
        prediction = model_call(noisy, timesteps, **extra)
        return mse(prediction, self.base.target(x0, noise, t)), {"conditions_kept": float(keep.float().mean())}

    def describe(self) -> dict[str, Any]:
        described = {"objective": f"control/{self.base.describe().get('objective')}", "base": self.base.describe(),
                     "condition_dropout": self.condition_dropout}
        if self.groups:
            described["condition_groups"] = [list(g) for g in self.groups]
        return described

    def sampling_scheduler(self, base: Any) -> Any:
        """The UNet is frozen: its scheduler stays."""
        return base

    def key(self) -> str:
        settings: dict[str, Any] = {"base": self.base.key(), "condition_dropout": self.condition_dropout}
        if self.groups:  # absent when empty: whole-map trainings keep their keys
            settings["groups"] = [list(g) for g in self.groups]
        return "dagfusion.structure.ControlObjective:" + json.dumps(settings, sort_keys=True)


# --- nodes ----------------------------------------------------------------------------------------


def _data_example() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(2, 3, 32, 32, generator=g), "captions": ["a red circle", "a blue square"],
            "depth": torch.rand(2, 1, 32, 32, generator=g), "mask": torch.rand(2, 1, 32, 32, generator=g).round()}


@node(
    "dagfusion.structure.ControlData",
    version="1.0.0",
    category="structure/training",
    inputs=[
        Input("images", "IMAGE", link_only=True, description="Training images (B, 3, H, W) in [0, 1]."),
        Input("captions", LIST, description="One caption per image."),
        *MAP_INPUTS,
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds the order of each pass."),
        Input("shuffle", BOOLEAN, True, description="Shuffle each pass (otherwise repeat in order)."),
    ],
    outputs=[Output("data", TRAINING_DATA, "Images, captions and control maps as an endless, seeded training stream.")],
    examples=[_data_example],
    ui={"color": _COLOR},
)
def control_data(ctx: RunContext, images: Any, captions: list[str], image: Any, depth: Any, normal: Any, mask: Any,
                 control: Any, seed: int, shuffle: bool) -> ControlData:
    """A training source of images, captions and control maps for TrainControlNet / TrainT2IAdapter.

    The maps are stacked image, depth, normal ((n + 1) / 2), mask, control — e.g. depth + normal +
    mask gives 5 channels for a ControlNet made with conditioning_channels 5 — and resized to the
    images' size.
    """
    try:
        stacked = stack_control({"image": image, "depth": depth, "normal": normal, "mask": mask, "control": control})
        return ControlData(images, list(captions), stacked, seed=seed, shuffle=shuffle)
    except ControlMapError as error:
        raise NodeInputError(error.input or "image", str(error)) from None
    except ValueError as error:
        raise NodeInputError("images", str(error)) from None


def _objective_example() -> dict[str, Any]:
    from dagfusion.nodes.training.objectives import EpsilonObjective

    return {"objective": EpsilonObjective(), "condition_dropout": 0.1}


@node(
    "dagfusion.structure.ControlObjective",
    version="1.1.0",
    category="structure/training",
    inputs=[
        Input("objective", OBJECTIVE, link_only=True, description="The noise objective (Epsilon, VPrediction, RectifiedFlow) of the model."),
        Input("condition_dropout", FLOAT, 0.05, min=0.0, max=1.0, description="Probability that a sample's control map is zeroed."),
        Input("groups", STRING, "",
              description="Channel groups dropped independently, e.g. 'depth=0:1, normal=1:4, layout=4:6' "
                          "(StructureCondition's ranges); empty: the whole map drops at once."),
    ],
    outputs=[Output("objective", OBJECTIVE, "The objective with control maps, for dagfusion.train.Train with trainable 'patches'.")],
    examples=[_objective_example],
    ui={"color": _COLOR},
)
def control_objective(ctx: RunContext, objective: Any, condition_dropout: float, groups: str = "") -> ControlObjective:
    """Wrap a noise objective so that it trains the model's ControlNet or adapter patch on control
    maps (the UNet stays frozen), zeroing each map — or each channel group of it — with condition_dropout.
    """
    try:
        spans = parse_condition_groups(groups)
    except ValueError as error:
        raise NodeInputError("groups", str(error)) from None
    try:
        return ControlObjective(objective, condition_dropout, spans)
    except ValueError as error:
        raise NodeInputError("objective", str(error)) from None


_TRAIN_INPUTS = [
    Input("data", TRAINING_DATA, link_only=True, description="A dagfusion.structure.ControlData source."),
    Input("clip", "CLIP", link_only=True, description="The text encoder bundle for the captions (frozen)."),
    Input("vae", "VAE", optional=True, link_only=True, description="The VAE mapping images to the model's latents (frozen)."),
    Input("objective", OBJECTIVE, link_only=True,
          description="The model's noise objective (Epsilon, VPrediction, RectifiedFlow), or a ControlObjective."),
    Input("condition_dropout", FLOAT, 0.05, min=0.0, max=1.0,
          description="Probability that a sample's control map is zeroed (ignored for a ControlObjective, which has its own)."),
    Input("steps", INT, 1000, min=1, max=10_000_000, description="Number of optimizer steps."),
    Input("batch_size", INT, 4, min=1, max=65536, description="Samples per step."),
    Input("learning_rate", FLOAT, 1e-5, min=0.0, max=1.0, description="Peak AdamW learning rate."),
    Input("schedule", STRING, "constant", choices=("constant", "cosine"), description="Learning-rate schedule after warmup."),
    Input("warmup_steps", INT, 0, min=0, max=10_000_000, description="Linear warmup steps."),
    Input("weight_decay", FLOAT, 0.01, min=0.0, max=10.0, description="AdamW weight decay."),
    Input("max_grad_norm", FLOAT, 1.0, min=0.0, max=1e6, description="Clip the gradient norm (0 = off)."),
    Input("caption_dropout", FLOAT, 0.0, min=0.0, max=1.0, description="Probability of an empty caption."),
    Input("precision", STRING, "auto", choices=("auto", "fp32", "bf16", "fp16"), description="Autocast on CUDA (fp32 on the CPU)."),
    Input("ema_decay", FLOAT, 0.0, min=0.0, max=0.999999, description="EMA of the trained weights (0 = off)."),
    Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds every random draw of the run."),
    Input("checkpoint_every", INT, 500, min=0, max=10_000_000,
          description="Checkpoint every N steps, at the end and on cancel (0 = none, no auto-resume)."),
    Input("keep_checkpoints", INT, 2, min=0, max=100_000, description="Keep the newest N checkpoints (0 = all)."),
    Input("resume", PATH, optional=True, description="A checkpoint folder to continue from."),
    Input("auto_resume", BOOLEAN, True, description="Continue from this training's own newest checkpoint when one exists."),
    Input("time_limit", FLOAT, 0.0, min=0.0, max=1e7, description="Minutes after which to checkpoint and stop (0 = none)."),
]


def train_network(ctx: RunContext, kind: str, type_id: str, model: Any, network: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Train ``network`` (a ControlNet or adapter handle) on the frozen ``model`` with the shared
    loop; ``inputs`` are the node's training inputs. Returns ``{"network", "final_loss",
    "checkpoint_dir"}`` (the trained network as a new handle)."""
    from dagfusion.fingerprint import fingerprint_path
    from dagfusion.nodes.training import checkpoint as ckpt
    from dagfusion.nodes.training.data import as_training_data
    from dagfusion.nodes.training.loop import CheckpointPolicy, TrainConfig, train
    from dagfusion.nodes.training.train import checkpoint_path, checkpoint_plan, training_key

    objective = inputs["objective"]
    if not isinstance(objective, ControlObjective):
        try:
            objective = ControlObjective(objective, inputs["condition_dropout"])
        except ValueError as error:
            raise NodeInputError("objective", str(error)) from None
    try:
        source = as_training_data(inputs["data"])
    except TypeError as error:
        raise NodeInputError("data", str(error)) from None
    patch = ControlTrainPatch(network.module, kind, network.fingerprint)
    channels = getattr(source, "channels", None)
    if channels is not None and channels != patch.channels:
        raise NodeInputError("data", f"the {kind} takes {patch.channels} conditioning channels, the data's control maps "
                                     f"have {channels}")
    config = TrainConfig(
        steps=inputs["steps"], batch_size=inputs["batch_size"], learning_rate=inputs["learning_rate"],
        schedule=inputs["schedule"], warmup_steps=inputs["warmup_steps"], weight_decay=inputs["weight_decay"],
        max_grad_norm=inputs["max_grad_norm"], caption_dropout=inputs["caption_dropout"],
        precision=inputs["precision"], ema_decay=inputs["ema_decay"], trainable="patches", seed=inputs["seed"],
    )
    resume = inputs.get("resume")
    explicit = ckpt.resolve(checkpoint_path(ctx, resume)) if resume else None
    trained_model = model.with_patch(patch)
    key = training_key({
        "node": type_id, "model": trained_model, "data": source, "clip": inputs["clip"], "vae": inputs["vae"],
        "objective": objective, "config": config.plain(),
        "resume": fingerprint_path(explicit) if explicit is not None else None,
    })
    every, time_limit = inputs["checkpoint_every"], inputs["time_limit"]
    folder, start_from = checkpoint_plan(ctx, key, explicit, wanted=every > 0 or time_limit > 0,
                                         auto_resume=inputs["auto_resume"])

    def progress(step: int, total: int, values: dict[str, float]) -> None:
        ctx.progress(step, total, message=f"training the {kind}", **values)

    try:
        result = train(
            trained_model, source, inputs["clip"], inputs["vae"], objective, config,
            checkpoints=CheckpointPolicy(folder=folder, every=every, keep=inputs["keep_checkpoints"],
                                         time_limit=time_limit * 60.0),
            resume=start_from, key=key, progress=progress, check_cancelled=ctx.check_cancelled, logger=ctx.logger,
        )
    except ControlMapError as error:
        raise NodeInputError("data", str(error)) from None
    trained = result.model.patches[-1].network
    trained.eval()
    trained.requires_grad_(False)
    handle = type(network).from_module(trained, source=f"trained from {network.info.get('source', '?')}",
                                       fingerprint=f"trained:{key}")
    return {"network": handle, "final_loss": result.final_loss, "checkpoint_dir": str(folder) if folder else ""}


def _train_example(kind: str) -> Any:
    def make() -> dict[str, Any]:
        import torch
        from dagfusion.nodes.training.objectives import EpsilonObjective
        from dagfusion.testing import models as tiny

        parts = tiny.sd_handles()
        g = torch.Generator().manual_seed(0)
        images = torch.rand(2, 3, 32, 32, generator=g)
        common = {"model": parts["model"], "clip": parts["clip"], "vae": parts["vae"], "objective": EpsilonObjective(),
                  "steps": 2, "batch_size": 2, "learning_rate": 1e-4, "checkpoint_every": 1, "condition_dropout": 0.5}
        if kind == "controlnet":
            from dagfusion.nodes.structure.controlnet import tiny_controlnet

            data = ControlData(images, ["a", "b"], images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1))
            return {**common, "control_net": tiny_controlnet(), "data": data}
        from dagfusion.nodes.structure.adapter import tiny_adapter

        data = ControlData(images, ["a", "b"], images)
        return {**common, "adapter": tiny_adapter(), "data": data, "model": tiny_adapter_model()}

    return make


def tiny_adapter_model() -> Any:
    """The tiny adapter-compatible UNet model (:func:`dagfusion.nodes.structure.adapter.tiny_adapter_handles`)."""
    from dagfusion.nodes.structure.adapter import tiny_adapter_handles

    return tiny_adapter_handles()["model"]


@node(
    "dagfusion.structure.TrainControlNet",
    version="1.0.0",
    category="structure/training",
    inputs=[
        Input("model", MODEL, link_only=True, description="The model whose UNet the ControlNet drives (frozen)."),
        Input("control_net", CONTROL_NET, link_only=True, description="The ControlNet to train (from ControlNetFromUNet or LoadControlNet); it is copied."),
        *_TRAIN_INPUTS,
    ],
    outputs=[
        Output("control_net", CONTROL_NET, "The trained ControlNet (a new handle)."),
        Output("final_loss", FLOAT, "Mean loss over the last 10 steps."),
        Output("checkpoint_dir", STRING, "The folder holding this training's checkpoints ('' without checkpoints)."),
    ],
    examples=[_train_example("controlnet")],
    ui={"color": _COLOR},
)
def train_controlnet(ctx: RunContext, model: Any, control_net: Any, **inputs: Any) -> dict[str, Any]:
    """Train a ControlNet on images, captions and control maps with dagfusion's training loop: the
    UNet frozen, the ControlNet trainable, the model's noise-prediction loss with the control map
    as conditioning, each map zeroed with condition_dropout. Seeded (bit-exact on the CPU),
    checkpointed in the cache folder and resumed like dagfusion.train.Train.
    """
    from dagfusion.nodes.structure.controlnet import _fits

    _fits(model, control_net)
    out = train_network(ctx, "controlnet", "dagfusion.structure.TrainControlNet", model, control_net, inputs)
    return {"control_net": out["network"], "final_loss": out["final_loss"], "checkpoint_dir": out["checkpoint_dir"]}


@node(
    "dagfusion.structure.TrainT2IAdapter",
    version="1.0.0",
    category="structure/training",
    inputs=[
        Input("model", MODEL, link_only=True, description="The model whose UNet the adapter feeds (frozen)."),
        Input("adapter", T2I_ADAPTER, link_only=True, description="The T2I-Adapter to train (from AdapterNew or LoadT2IAdapter); it is copied."),
        *_TRAIN_INPUTS,
    ],
    outputs=[
        Output("adapter", T2I_ADAPTER, "The trained adapter (a new handle)."),
        Output("final_loss", FLOAT, "Mean loss over the last 10 steps."),
        Output("checkpoint_dir", STRING, "The folder holding this training's checkpoints ('' without checkpoints)."),
    ],
    examples=[_train_example("adapter")],
    ui={"color": _COLOR},
)
def train_t2i_adapter(ctx: RunContext, model: Any, adapter: Any, **inputs: Any) -> dict[str, Any]:
    """Train a T2I-Adapter on images, captions and control maps with dagfusion's training loop: the
    UNet frozen, the adapter trainable, its features added to the UNet's encoder, each map zeroed
    with condition_dropout. Checkpointed and resumed like dagfusion.train.Train.
    """
    from dagfusion.nodes.structure.adapter import fits

    fits(model, adapter)
    out = train_network(ctx, "adapter", "dagfusion.structure.TrainT2IAdapter", model, adapter, inputs)
    return {"adapter": out["network"], "final_loss": out["final_loss"], "checkpoint_dir": out["checkpoint_dir"]}


NODES = (control_data, control_objective, train_controlnet, train_t2i_adapter)
"""The training nodes of the structure pack, in palette order."""
