"""A contact sheet: a batch of images laid out in a grid, each with an optional label under it.

Labels are drawn with PIL's default font, wrapped to the cell's width (a word longer than the
cell is cut); the label strip is as tall as the longest wrapped label. Cells are separated by
``padding`` pixels of ``background``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dagfusion import INT, LIST, STRING, Input, Output, RunContext, node
from dagfusion.nodes.diffusion.types import IMAGE
from dagfusion.nodes.everyday.batches import as_batch

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
_TEXT = {"white": (0, 0, 0), "black": (255, 255, 255), "gray": (255, 255, 255)}


def wrap(text: str, width: int, measure: Any) -> list[str]:
    """``text`` as lines no wider than ``width`` pixels by ``measure(str) -> float``."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if measure(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while measure(word) > width and len(word) > 1:  # cut a word wider than the cell
                cut = len(word)
                while cut > 1 and measure(word[:cut]) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def contact_sheet(
    images: Any, labels: Sequence[Any] | None = None, columns: int = 0, padding: int = 2, background: str = "white"
) -> Any:
    """One image ``(1, 3, H, W)`` in [0, 1] showing every image of ``images`` with its label.

    ``columns = 0`` picks ``ceil(sqrt(B))``. :raises ValueError: more labels than images.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from dagfusion.nodes.diffusion.images import to_pil

    batch = as_batch(images).detach().float().cpu().clamp(0, 1)
    count, channels, height, width = (int(v) for v in batch.shape)
    if channels == 1:
        batch = batch.expand(-1, 3, -1, -1)
    elif channels == 4:
        batch = batch[:, :3]
    labels = [str(label) for label in (labels or [])]
    if len(labels) > count:
        raise ValueError(f"{len(labels)} labels for {count} image(s); give at most one label per image")
    columns = columns or math.ceil(math.sqrt(count))
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def measure(text: str) -> float:
        return float(scratch.textlength(text, font=font))

    line_height = 0
    wrapped = [wrap(label, width - 2, measure) if label else [] for label in labels]
    if any(wrapped):
        box = scratch.textbbox((0, 0), "Ag", font=font)
        line_height = int(box[3] - box[1]) + 3
    strip = max((len(lines) for lines in wrapped), default=0) * line_height + (2 if line_height else 0)
    cell_h = height + strip
    sheet = Image.new(
        "RGB", (columns * width + (columns + 1) * padding, rows * cell_h + (rows + 1) * padding), BACKGROUNDS[background]
    )
    draw = ImageDraw.Draw(sheet)
    for index in range(count):
        row, column = divmod(index, columns)
        x = padding + column * (width + padding)
        y = padding + row * (cell_h + padding)
        sheet.paste(to_pil(batch[index]), (x, y))
        for number, line in enumerate(wrapped[index] if index < len(wrapped) else []):
            draw.text((x + 1, y + height + 1 + number * line_height), line, fill=_TEXT[background], font=font)
    array = np.asarray(sheet, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()


def _example() -> dict[str, Any]:
    import torch

    images = torch.linspace(0, 1, 3 * 3 * 16 * 16).reshape(3, 3, 16, 16)
    return {"images": images, "labels": ["a red circle", "b", "a very long label"], "columns": 2}


@node(
    "dagfusion.image.Grid",
    version="1.0.0",
    category="image",
    inputs=[
        Input("images", IMAGE, link_only=True, description="The images (B, C, H, W), laid out row by row."),
        Input("labels", LIST, optional=True, description="Text under each image (the first len(labels) images; fewer is fine)."),
        Input("columns", INT, 0, min=0, max=256, description="Images per row (0: ceil(sqrt(B)), a near-square sheet)."),
        Input("padding", INT, 2, min=0, max=64, description="Pixels between and around the cells."),
        Input("background", STRING, "white", choices=tuple(BACKGROUNDS), description="Colour behind the cells and labels."),
    ],
    outputs=[Output("image", IMAGE, "One picture (1, 3, H, W) with every image and its label.")],
    examples=[_example, lambda: {"images": _example()["images"][:1]}],
)
def grid(ctx: RunContext, images: Any, labels: list[Any] | None, columns: int, padding: int, background: str) -> Any:
    """Lay a batch of images out as a labelled grid (a contact sheet), labels in PIL's default font."""
    return contact_sheet(images, labels, columns, padding, background)


NODES = (grid,)
