"""The dagfusion metadata of a video file: the workflow, the run manifest and the clip's own
description (frames, size, frame rate), as one JSON document.

Where it goes:

- **MP4**: the container's ``comment`` tag (``moov/udta/meta/ilst/©cmt``);
- **WebP**: an XMP packet (``<dagfusion:metadata>``, the JSON XML-escaped);
- **GIF**: a comment extension;
- otherwise (the container could not carry it): a sidecar ``NAME.EXT.json`` next to the file.

:func:`read_video_metadata` finds it in a file (without decoding any frame) or in its sidecar;
:func:`read_video_workflow` is what :func:`dagfusion.sources.read_text` uses to re-run the
workflow of a video (``dagfusion run clip.mp4``).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from dagfusion.nodes.video.containers import MAX_METADATA_BYTES, read_metadata_text

FORMAT = "dagfusion.video/1"
"""The ``format`` field of every metadata document this version writes."""

SIDECAR_SUFFIX = ".json"
"""Appended to a video's file name to name its sidecar (``clip_00000.mp4.json``)."""


def encode_metadata(video: dict[str, Any], workflow: str | None = None, manifest: dict[str, Any] | None = None) -> str:
    """The metadata document as ASCII JSON: ``{"format", "video", "workflow"?, "manifest"?}``.

    ``video`` describes the clip as saved (``frames``, ``fps``, ``width``, ``height``…); the
    workflow and manifest are left out when ``None``.
    """
    document: dict[str, Any] = {"format": FORMAT, "video": video}
    if workflow is not None:
        document["workflow"] = workflow
    if manifest is not None:
        document["manifest"] = manifest
    return json.dumps(document, ensure_ascii=True, default=str, separators=(",", ":"))


def decode_metadata(text: str | bytes | None) -> dict[str, Any] | None:
    """The metadata document in ``text``, or ``None`` if it is not one (never raises)."""
    if text is None or len(text) > MAX_METADATA_BYTES:
        return None
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("video"), dict):
        return None
    if "workflow" in document and not isinstance(document["workflow"], str):
        return None
    return document


def xmp_packet(metadata: str) -> bytes:
    """An XMP packet carrying ``metadata`` (ASCII JSON) in a ``dagfusion:metadata`` element."""
    escaped = metadata.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dagfusion="urn:dagfusion:video:1">'
        f"<dagfusion:metadata>{escaped}</dagfusion:metadata>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="r"?>'
    ).encode()


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the sidecar of the video at ``path`` is (``clip.mp4`` → ``clip.mp4.json``)."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike[str], metadata: str) -> Path:
    """Write ``metadata`` into the sidecar of the video at ``path``; returns the sidecar's path."""
    target = sidecar_path(path)
    target.write_text(metadata, encoding="ascii")
    return target


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The metadata document in the sidecar of the video at ``path``, or ``None`` (missing,
    not a regular file, over :data:`~dagfusion.nodes.video.containers.MAX_METADATA_BYTES`, not
    a metadata document). Never raises for the file's content."""
    target = sidecar_path(path)
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_METADATA_BYTES:
            return None
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            return decode_metadata(fh.read(MAX_METADATA_BYTES + 1))
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def read_video_metadata(source: str | os.PathLike[str] | IO[bytes], sidecar: bool = True) -> dict[str, Any] | None:
    """The metadata document of a video: embedded in the container, else (for a path, when
    ``sidecar``) in its sidecar; ``None`` if there is none. Decodes no frame; never raises for
    the file's content."""
    document = decode_metadata(read_metadata_text(source))
    if document is None and sidecar and isinstance(source, (str, os.PathLike)):
        document = read_sidecar(source)
    return document


def read_video_workflow(source: str | os.PathLike[str] | IO[bytes]) -> str | None:
    """The workflow YAML embedded in a dagfusion video (or its sidecar), or ``None``."""
    document = read_video_metadata(source)
    return None if document is None else document.get("workflow")


__all__ = [
    "FORMAT", "SIDECAR_SUFFIX", "decode_metadata", "encode_metadata", "read_sidecar", "read_video_metadata",
    "read_video_workflow", "sidecar_path", "write_sidecar", "xmp_packet",
]
