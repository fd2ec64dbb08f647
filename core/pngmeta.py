"""Workflows embedded in PNG files: text chunks ``dagfusion.workflow`` (YAML) and
``dagfusion.manifest`` (JSON), so a picture can be inspected and re-run."""

from __future__ import annotations

import json
import os
from typing import Any

WORKFLOW_KEY = "dagfusion.workflow"
MANIFEST_KEY = "dagfusion.manifest"
MAX_CHUNK_CHARS = 16 * 1024 * 1024


def png_info(workflow_yaml: str, manifest: dict[str, Any] | None = None) -> Any:
    """A ``PIL.PngImagePlugin.PngInfo`` holding the workflow and manifest as compressed text."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(WORKFLOW_KEY, workflow_yaml, zip=True)
    if manifest is not None:
        info.add_itxt(MANIFEST_KEY, json.dumps(manifest, default=str), zip=True)
    return info


def read_png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """The dagfusion text chunks of a PNG file (empty if it has none)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            text = dict(getattr(image, "text", {}) or {})
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return {}
    return {
        k: str(v)
        for k, v in text.items()
        if k in (WORKFLOW_KEY, MANIFEST_KEY) and isinstance(v, str) and len(v) <= MAX_CHUNK_CHARS
    }


def is_png(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False
