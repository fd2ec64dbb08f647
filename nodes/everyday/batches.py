"""Image batches: join images into one batch, split a batch, pick images out of it.

IMAGE values are tensors ``(B, C, H, W)`` in [0, 1]. Joining needs equal ``(C, H, W)``: a
mismatch is an error naming both shapes (resize first). Every node returns new tensors; its
inputs are never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dagfusion import INT, LIST, STRING, Input, Output, RunContext, node
from dagfusion.nodes.diffusion.types import IMAGE


def as_batch(images: Any, what: str = "images") -> Any:
    """``images`` as ``(B, C, H, W)`` (a single ``(C, H, W)`` image gains a batch axis)."""
    if getattr(images, "ndim", None) == 3:
        images = images.unsqueeze(0)
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"expected {what} as a tensor (B, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    return images


def join(parts: Sequence[Any]) -> Any:
    """One batch from ``parts`` in order; every image must have the same ``(C, H, W)``."""
    import torch

    if not parts:
        raise ValueError("expected at least one image, got none")
    batches = [as_batch(p, f"item {i}") for i, p in enumerate(parts)]
    first = tuple(batches[0].shape[1:])
    for index, batch in enumerate(batches[1:], 1):
        if tuple(batch.shape[1:]) != first:
            raise ValueError(
                f"item {index} has images of shape {tuple(batch.shape[1:])} (C, H, W), but item 0 has {first}; "
                "resize them to one size before joining"
            )
    dtype = batches[0].dtype
    for batch in batches[1:]:
        dtype = torch.promote_types(dtype, batch.dtype)
    return torch.cat([b.to(dtype) for b in batches])


def parse_indices(text: str, size: int) -> list[int]:
    """Indices from ``"0, 2, -1"`` and ranges ``"1:4"`` (end excluded) into a batch of ``size``.

    Negative indices count from the end. :raises ValueError: an item is not an index or is out of range.
    """
    chosen: list[int] = []
    for item in (piece.strip() for piece in text.split(",")):
        if not item:
            continue
        try:
            if ":" in item:
                start, _, stop = item.partition(":")
                chosen.extend(range(size)[slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)])
                continue
            index = int(item)
        except ValueError:
            raise ValueError(f"expected indices like '0, 2, -1' or '1:4', got {item!r}") from None
        if not -size <= index < size:
            raise ValueError(f"index {index} is outside a batch of {size} image(s)")
        chosen.append(index % size)
    if not chosen:
        raise ValueError(f"{text!r} selects no image")
    return chosen


def _images(batch: int = 3, size: int = 8) -> Any:
    import torch

    return torch.linspace(0, 1, batch * 3 * size * size).reshape(batch, 3, size, size)


@node(
    "dagfusion.image.Batch",
    version="1.0.0",
    category="image",
    inputs=[Input("images", LIST, link_only=True, description="Images or image batches, all of one (C, H, W).")],
    outputs=[Output("images", IMAGE, "Every image, in order, as one batch.")],
    examples=[lambda: {"images": [_images(1), _images(2)]}],
)
def batch_images(ctx: RunContext, images: list[Any]) -> Any:
    """Join a list of images (or batches) into one batch, in order."""
    return join(list(images))


@node(
    "dagfusion.image.Unbatch",
    version="1.0.0",
    category="image",
    inputs=[Input("images", IMAGE, link_only=True, description="A batch (B, C, H, W).")],
    outputs=[Output("images", LIST, "B images, each (1, C, H, W).")],
    examples=[lambda: {"images": _images(3)}],
)
def unbatch_images(ctx: RunContext, images: Any) -> list[Any]:
    """Split a batch into a list of single images (each keeps a batch axis of 1)."""
    batch = as_batch(images)
    return [batch[i : i + 1].clone() for i in range(batch.shape[0])]


@node(
    "dagfusion.image.Select",
    version="1.0.0",
    category="image",
    inputs=[
        Input("images", IMAGE, link_only=True, description="A batch (B, C, H, W)."),
        Input("indices", STRING, "0",
              description="Which images, in this order: '0, 2, -1' (negative counts from the end) or ranges '1:4'."),
    ],
    outputs=[Output("images", IMAGE, "The chosen images as a batch.")],
    examples=[lambda: {"images": _images(4), "indices": "-1, 0:2"}],
)
def select_images(ctx: RunContext, images: Any, indices: str) -> Any:
    """Pick images out of a batch by index (repeats allowed)."""
    import torch

    batch = as_batch(images)
    chosen = parse_indices(indices, int(batch.shape[0]))
    return batch.index_select(0, torch.tensor(chosen, dtype=torch.long, device=batch.device))


@node(
    "dagfusion.image.Concat",
    version="1.0.0",
    category="image",
    inputs=[
        Input("a", IMAGE, link_only=True, description="First images (B1, C, H, W)."),
        Input("b", IMAGE, link_only=True, description="Images appended after them (B2, C, H, W)."),
    ],
    outputs=[Output("images", IMAGE, "B1 + B2 images.")],
    examples=[lambda: {"a": _images(2), "b": _images(1)}],
)
def concat_images(ctx: RunContext, a: Any, b: Any) -> Any:
    """Two image batches as one (``a`` first); both must have the same (C, H, W)."""
    return join([a, b])


NODES = (batch_images, unbatch_images, select_images, concat_images)
