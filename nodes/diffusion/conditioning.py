"""Conditioning nodes that need no text encoder: class labels for class-conditional models (DiT)."""

from __future__ import annotations

from typing import Any

from dagfusion import STRING, Input, Output, RunContext, node
from dagfusion.nodes.diffusion.data import Conditioning
from dagfusion.nodes.diffusion.types import CONDITIONING


def parse_labels(text: str) -> list[int]:
    """``"207, 360 88"`` -> ``[207, 360, 88]``; raises ``ValueError`` naming a bad entry."""
    labels = []
    for part in text.replace(",", " ").split():
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"expected class ids (integers separated by commas or spaces), got {part!r} in {text!r}") from None
        if value < 0:
            raise ValueError(f"class ids must not be negative, got {value}")
        labels.append(value)
    if not labels:
        raise ValueError("expected at least one class id (like '207' or '207, 360'), got an empty string")
    return labels


def class_conditioning(labels: list[int]) -> Conditioning:
    """Conditioning for a class-conditional model; the sampler adds the model's null class for guidance."""
    import torch

    return Conditioning("class", {"class_labels": torch.tensor(labels, dtype=torch.long)}, None,
                        {"class_labels": list(labels)})


@node(
    "dagfusion.conditioning.ClassLabel",
    version="1.0.0",
    category="conditioning",
    inputs=[
        Input("class_ids", STRING, "207",
              description="Class ids separated by commas (ImageNet ids for DiT); one image per id."),
    ],
    outputs=[Output("conditioning", CONDITIONING, "Class-label conditioning for a class-conditional model (DiT).")],
    examples=[{"class_ids": "1, 2"}],
)
def class_label_node(ctx: RunContext, class_ids: str) -> Conditioning:
    """Class-label conditioning for class-conditional models such as DiT.

    Under guidance the sampler pairs each label with the model's null class (the last class
    embedding), as diffusers' DiTPipeline does.
    """
    return class_conditioning(parse_labels(class_ids))


NODES: tuple[Any, ...] = (class_label_node,)
