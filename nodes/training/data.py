"""Training data sources: the seam between datasets and the training loop.

The loop reads data only through :meth:`TrainingData.examples`: sample ``i`` of a run's
stream is always the same, and step ``s`` of a run with batch size ``B`` reads samples
``s·B … s·B + B − 1``. So a batch is rebuilt exactly from the step alone, and resuming needs
no data state.

A data source is either

- a :class:`TrainingData` subclass (the ``TRAINING_DATA`` socket type): implement
  ``examples(first, count)`` and ``__dagfusion_fingerprint__`` (its identity, for caching); or
- any object with ``batch(first_index, count)`` returning something with ``images``
  ``(B, C, H, W)`` in [0, 1] and ``captions`` (attributes or mapping keys) — the shapes pack's
  ``ShapesDataset`` is one; :func:`as_training_data` wraps it.

Other packs connect their datasets to the Train node by giving their socket type
``parents=("TRAINING_DATA",)`` and their class a ``TrainingData`` base (or a ``batch`` method),
or by registering an adapter: a pack's ``register_data_adapters(register)`` function calls
``register(adapter)`` for each (the built-in packs' are collected on first use), and
:func:`register_adapter` adds one directly.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagfusion import LIST, SEED, STRING, Input, Output, RunContext, node, union
from dagfusion.errors import NodeInputError
from dagfusion.nodes.training.types import TRAINING_DATA


@dataclass(frozen=True)
class Examples:
    """A batch from a data source.

    Attributes:
        images: Float tensor ``(B, C, H, W)`` with values in [0, 1] (C = 3; a 4th channel is dropped),
            or clips ``(B, F, C, H, W)`` for objectives that prepare video batches themselves.
        captions: One caption per image.
        raw: The source's own batch object (masks, labels … for objectives that want them).
    """

    images: Any
    captions: tuple[str, ...]
    raw: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        images = self.images
        if getattr(images, "ndim", None) not in (4, 5):
            raise ValueError(
                f"a data source must give images (B, C, H, W) or clips (B, F, C, H, W), got shape "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        if len(self.captions) != images.shape[0]:
            raise ValueError(f"a data source gave {images.shape[0]} images but {len(self.captions)} captions")


class TrainingData:
    """Base class of data sources (the ``TRAINING_DATA`` socket type); see the module docstring."""

    def examples(self, first: int, count: int) -> Examples:
        """Samples ``first … first + count − 1`` of the source's endless stream."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Plain data about the source (shown in checkpoints)."""
        return {"source": type(self).__name__}

    def __dagfusion_fingerprint__(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must define __dagfusion_fingerprint__ (its identity)")


def _field(batch: Any, name: str) -> Any:
    if isinstance(batch, Mapping):
        return batch[name]
    return getattr(batch, name)


class BatchSource(TrainingData):
    """Adapts an object with ``batch(first_index, count)`` (like ``ShapesDataset``) to :class:`TrainingData`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def examples(self, first: int, count: int) -> Examples:
        batch = self.dataset.batch(first, count)
        return Examples(_field(batch, "images"), tuple(str(c) for c in _field(batch, "captions")), batch)

    def describe(self) -> dict[str, Any]:
        describe = getattr(self.dataset, "describe", None)
        return {"source": type(self.dataset).__name__, **(describe() if callable(describe) else {})}

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import fingerprint

        fp = fingerprint(self.dataset)
        if fp is None:
            raise TypeError(f"{type(self.dataset).__name__} cannot be fingerprinted; give it __dagfusion_fingerprint__")
        return f"batch-source:{fp}"


Adapter = Callable[[Any], TrainingData | None]
"""Turns a value into a :class:`TrainingData`, or returns ``None`` for values it does not know."""

_ADAPTERS: list[Adapter] = []  # asking order: the most recently registered first, built-ins last
_LOCK = threading.RLock()
_BUILTINS_LOADED = False


def batch_source_adapter(value: Any) -> TrainingData | None:
    """The built-in rule: an object with a ``batch(first_index, count)`` method, as a :class:`BatchSource`."""
    return BatchSource(value) if callable(getattr(value, "batch", None)) else None


def register_data_adapters(register: Callable[[Adapter], None]) -> None:
    """The training pack's adapters (:func:`batch_source_adapter`): ``register(adapter)`` each."""
    register(batch_source_adapter)


def _ensure_builtins() -> None:
    """Collect the built-in packs' ``register_data_adapters`` once (asked after every other adapter)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    with _LOCK:
        if _BUILTINS_LOADED:
            return
        from dagfusion.plugins import builtin_plugin_modules

        _BUILTINS_LOADED = True
        builtins: list[Adapter] = []
        try:
            for module_name in builtin_plugin_modules().values():
                hook = getattr(importlib.import_module(module_name), "register_data_adapters", None)
                if callable(hook):
                    hook(register=builtins.append)
        except BaseException:
            _BUILTINS_LOADED = False
            raise
        _ADAPTERS.extend(a for a in builtins if a not in _ADAPTERS)


def adapter_registrar() -> Callable[[Adapter], None]:
    """The ``register`` callback for one pack's ``register_data_adapters(register)``: the pack's
    new adapters are asked before those registered earlier (the built-in ``batch()`` rule
    included), among themselves in the order the pack registers them; an adapter already
    registered stays where it is."""
    position = 0

    def register(adapter: Adapter) -> None:
        nonlocal position
        if not callable(adapter):
            raise TypeError(f"expected a training-data adapter (a callable), got {type(adapter).__name__}")
        _ensure_builtins()
        with _LOCK:
            if adapter not in _ADAPTERS:
                _ADAPTERS.insert(position, adapter)
                position += 1

    return register


def register_adapter(adapter: Adapter) -> None:
    """Teach :func:`as_training_data` a new kind of dataset: ``adapter(value)`` returns a
    :class:`TrainingData` for values it knows, else ``None``. It is asked before every adapter
    registered earlier, the built-in ``batch()`` rule included; registering it again changes nothing."""
    adapter_registrar()(adapter)


def as_training_data(value: Any) -> TrainingData:
    """``value`` as a :class:`TrainingData` (see the module docstring).

    :raises TypeError: ``value`` is not a data source.
    """
    if isinstance(value, TrainingData):
        return value
    _ensure_builtins()
    with _LOCK:
        adapters = list(_ADAPTERS)
    for adapter in adapters:
        adapted = adapter(value)
        if adapted is not None:
            return adapted
    raise TypeError(
        f"expected a training data source (a TrainingData, or an object with batch(first_index, count)), "
        f"got {type(value).__name__}"
    )


class ImageCaptionData(TrainingData):
    """A fixed set of images with captions, repeated: sample ``i`` is pair ``order[i mod N]``, with a
    new seeded permutation each pass (``shuffle``) or in order."""

    def __init__(self, images: Any, captions: Sequence[str], *, seed: int = 0, shuffle: bool = True) -> None:
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
        if len(captions) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(captions)} captions; give one caption per image")
        if images.shape[0] == 0:
            raise ValueError("got no images")
        self.images = images.detach().float().cpu()
        self.captions = tuple(str(c) for c in captions)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)

    def __len__(self) -> int:
        return len(self.captions)

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
        return Examples(self.images[chosen], tuple(self.captions[k] for k in chosen))

    def describe(self) -> dict[str, Any]:
        return {"source": "images", "count": len(self), "shuffle": self.shuffle, "seed": self.seed}

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import fingerprint

        return "images:" + str(fingerprint({"images": self.images, "captions": list(self.captions),
                                            "seed": self.seed, "shuffle": self.shuffle}))


def _example() -> dict[str, Any]:
    import torch

    return {"images": torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), "captions": ["a", "b"]}


@node(
    "dagfusion.train.ImageData",
    version="1.0.0",
    category="training",
    inputs=[
        Input("images", "IMAGE", link_only=True, description="Training images (B, 3, H, W) in [0, 1]."),
        Input("captions", LIST, description="One caption per image."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds the order of each pass over the images."),
        Input("shuffle", "BOOLEAN", True, description="Shuffle each pass (otherwise repeat in order)."),
    ],
    outputs=[Output("data", TRAINING_DATA, "The images as an endless, seeded training stream.")],
    examples=[_example],
)
def image_data(ctx: RunContext, images: Any, captions: list[str], seed: int, shuffle: bool) -> ImageCaptionData:
    """A training data source from a batch of images and their captions (small custom datasets)."""
    return ImageCaptionData(images, list(captions), seed=seed, shuffle=shuffle)


class ReplacedCaptions(TrainingData):
    """A training data source whose captions have each whole word ``find`` replaced by ``replace``
    (teach ``"<pink>"`` with a dataset captioned ``"pink"``); images are unchanged."""

    def __init__(self, source: Any, find: str, replace: str) -> None:
        import re

        self.source = as_training_data(source)
        self.find, self.replace = find, replace
        self._pattern = re.compile(rf"(?<![\w<]){re.escape(find)}(?![\w>])")

    def examples(self, first: int, count: int) -> Any:
        import dataclasses

        batch = self.source.examples(first, count)
        captions = tuple(self._pattern.sub(lambda _: self.replace, c) for c in batch.captions)
        return dataclasses.replace(batch, captions=captions)

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "replace": [self.find, self.replace]}

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import fingerprint

        return "replaced-captions:" + str(fingerprint({"source": self.source, "find": self.find, "replace": self.replace}))


def _replace_example() -> dict[str, Any]:
    from dagfusion.nodes.shapes.concept import concept_dataset

    return {"data": concept_dataset("pink", "", "train", 32, 0, 0.0), "find": "pink", "replace": "<pink>"}


@node(
    "dagfusion.train.ReplaceInCaptions",
    version="1.0.0",
    category="training",
    inputs=[
        Input("data", union("SHAPES_DATASET", TRAINING_DATA), link_only=True, description="Training data with captions."),
        Input("find", STRING, description="The word to replace (whole words only), e.g. 'pink'."),
        Input("replace", STRING, description="What to put instead, e.g. the new token '<pink>'."),
    ],
    outputs=[Output("data", TRAINING_DATA, "The same samples with the word replaced in every caption.")],
    examples=[_replace_example],
)
def replace_in_captions(ctx: RunContext, data: Any, find: str, replace: str) -> ReplacedCaptions:
    """Replace a word in every caption of a training data source, e.g. a colour's name by the new
    token an embedding learns (dagfusion.text.TrainableEmbedding); the images are unchanged."""
    if not find.strip():
        raise NodeInputError("find", "expected a word to replace")
    return ReplacedCaptions(data, find.strip(), replace.strip())


NODES = (image_data, replace_in_captions)
