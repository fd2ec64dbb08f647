"""The pixel limit of image decoding: sizes are checked from the file's header, before any pixel
is decoded, against ``max_image_pixels`` in the settings (``DAGFUSION_MAX_IMAGE_PIXELS``).

Every node that reads a picture opens it with :func:`open_image`, so a small file declaring a
huge image (an "image bomb") is refused with :class:`ImageTooLargeError` instead of taking
gigabytes of memory. Pillow's own process-wide bomb limit (``Image.MAX_IMAGE_PIXELS``) is set
aside only for the moment of reading a header, under a lock, and restored right after; the
settings' limit replaces it.
"""

from __future__ import annotations

import os
import threading
from typing import IO, Any

from dagfusion.errors import UnsafeOperationError

_PILLOW_LIMIT_LOCK = threading.Lock()


class ImageTooLargeError(UnsafeOperationError):
    """An image's header declares more pixels than the settings allow; nothing was decoded."""


def check_image_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    """Refuse a ``width`` × ``height`` image of more than ``max_pixels`` pixels.

    :raises ImageTooLargeError: naming ``name``, its size, the limit and the setting.
    """
    pixels = width * height
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}×{height} = {pixels:,} pixels, more than the limit of {max_pixels:,} pixels; "
            "raise max_image_pixels in the settings (or DAGFUSION_MAX_IMAGE_PIXELS) to read it"
        )


def open_image(source: str | os.PathLike[str] | IO[bytes], max_pixels: int, formats: tuple[str, ...] | None = None) -> Any:
    """A Pillow image opened lazily from ``source`` whose size is within ``max_pixels``.

    Only the header has been read when this returns: the caller decodes (``load()``,
    ``convert()``…) and closes it (use it as a context manager). ``formats`` limits the decoders
    Pillow may try (``None``: all).

    :raises ImageTooLargeError: the header declares more than ``max_pixels`` pixels (the file is
        closed and no pixel is decoded).
    :raises PIL.UnidentifiedImageError: Pillow cannot read the file.
    """
    name = repr(str(source)) if isinstance(source, (str, os.PathLike)) else "the image"
    picture = _open_header(source, formats)
    try:
        width, height = picture.size
        check_image_pixels(name, width, height, max_pixels)
    except BaseException:
        picture.close()
        raise
    return picture


def _open_header(source: str | os.PathLike[str] | IO[bytes], formats: tuple[str, ...] | None) -> Any:
    """``PIL.Image.open(source)`` (header only) with Pillow's own pixel limit set aside meanwhile."""
    from PIL import Image

    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(source, formats=list(formats) if formats else None)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
