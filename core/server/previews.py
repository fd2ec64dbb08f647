"""Pictures a node shows while it runs, made small enough to travel in a job's event log.

:func:`encode_preview` turns a preview (a PIL image, a NumPy array, a torch tensor, or a list
of frames) into ``(data URL, width, height, kind)``: a PNG, or an animated GIF for frames,
whose longest side is at most ``side``. :func:`preview_data` is the JSON form a
``NodePreview`` event carries in the job server's events (``{"url", "width", "height",
"kind"}``), or ``None`` when the preview cannot be shown — never an exception.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

log = logging.getLogger("dagfusion.server")

#: Longest side of a preview sent to a browser (bigger pictures are scaled down).
PREVIEW_SIDE = 768
#: Longest side of a preview stored in a job's event log.
EVENT_PREVIEW_SIDE = 512
#: Frames kept of a video preview.
MAX_FRAMES = 120


def _to_pil(image: Any) -> Any:
    """A PIL image from a PIL image, a NumPy array or a torch tensor (C,H,W / H,W,C / H,W)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = image
    if hasattr(array, "detach"):  # torch tensor, imported by whoever made it
        array = array.detach().float().cpu().numpy()
    import numpy as np

    array = np.asarray(array)
    while array.ndim > 3:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = np.clip(array.astype(np.float64), 0.0, 1.0)
        array = (array * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array)


def _thumbnail(picture: Any, side: int) -> Any:
    if max(picture.size) > side:
        picture = picture.copy()
        picture.thumbnail((side, side))
    return picture


def encode_preview(preview: Any, side: int = PREVIEW_SIDE) -> tuple[str, int, int, str]:
    """``(data URL, width, height, kind)`` of a preview: a picture, or a list of frames (video)."""
    frames = list(preview) if isinstance(preview, (list, tuple)) else None
    if frames is not None and len(frames) > 1:
        pictures = [_thumbnail(_to_pil(f), side) for f in frames[:MAX_FRAMES]]
        buffer = io.BytesIO()
        first = pictures[0].convert("RGB")
        first.save(buffer, format="GIF", save_all=True, append_images=[p.convert("RGB") for p in pictures[1:]], duration=83, loop=0)
        kind, mime, size = "video", "image/gif", first.size
    else:
        picture = _thumbnail(_to_pil(frames[0] if frames else preview), side)
        if picture.mode not in ("RGB", "RGBA", "L", "LA"):
            picture = picture.convert("RGBA")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        kind, mime, size = "image", "image/png", picture.size
    url = f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return url, size[0], size[1], kind


def preview_data(preview: Any, side: int = EVENT_PREVIEW_SIDE) -> dict[str, Any] | None:
    """The event-log form of a preview, or ``None`` (logged) when it is not a picture."""
    if preview is None:
        return None
    try:
        url, width, height, kind = encode_preview(preview, side)
    except Exception:  # a preview that cannot be shown must not fail the job
        log.warning("a preview could not be encoded", exc_info=True)
        return None
    return {"url": url, "width": width, "height": height, "kind": kind}


__all__ = ["EVENT_PREVIEW_SIDE", "MAX_FRAMES", "PREVIEW_SIDE", "encode_preview", "preview_data"]
