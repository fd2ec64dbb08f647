"""Reading a workflow from where users keep one: a YAML file, or a PNG or video (MP4, WebP, GIF)
that dagfusion wrote.

:func:`read_source` is the one reader the CLI, the engine and :func:`~dagfusion.load_workflow`
share. It takes a path or the file's bytes, tells YAML from PNG by the PNG signature (and from a
video by its container's signature: :mod:`dagfusion.nodes.video.metadata`), refuses
files over the size limits before reading them, and never raises for the file's content:
every problem comes back as a :class:`~dagfusion.errors.Problem`. :func:`read_text` stops one
step earlier, at the workflow's YAML text (what the engine hashes to recognise a file it has
already validated).
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dagfusion.errors import Problem
from dagfusion.pngmeta import PNG_SIGNATURE, WORKFLOW_KEY, read_png_text
from dagfusion.workflow import Workflow, parse_workflow
from dagfusion.yamlsource import MAX_BYTES as MAX_YAML_BYTES

MAX_PNG_BYTES = 64 * 1024 * 1024
"""Largest PNG file read for its embedded workflow."""

Source = str | os.PathLike[str] | bytes
"""A path to a YAML, PNG or video file, or the file's bytes."""

_HEAD_BYTES = 12
"""Bytes read to tell the file's kind (PNG signature; MP4, WebP and GIF signatures)."""


@dataclass(frozen=True)
class SourceText:
    """The workflow text found in a source.

    Attributes:
        text: The YAML text (bytes as read from a YAML file; text from a PNG chunk or a video's metadata).
        name: What problems name as the source (the path, or the ``name`` given).
        kind: ``"yaml"``, ``"png"``, or the video container (``"mp4"``, ``"webp"``, ``"gif"``).
    """

    text: str | bytes
    name: str | None
    kind: str


def read_text(source: Source, name: str | None = None) -> tuple[SourceText | None, list[Problem]]:
    """The workflow YAML text in ``source``, or ``None`` and the problems that prevent reading it.

    ``source`` is a path or the bytes of a file; ``name`` is what problems name as the source
    (default: the path). Problems: ``unreadable`` (missing, not a regular file, no permission),
    ``yaml-too-large`` (over :data:`~dagfusion.yamlsource.MAX_BYTES`), ``png-too-large`` (over
    :data:`MAX_PNG_BYTES`), ``no-workflow`` (a PNG, or a video without one embedded or in its
    ``NAME.EXT.json`` sidecar). Sizes are checked before the content is read (a video's metadata
    is read with bounds, decoding no frame); special files (FIFOs, devices) are never read.
    """
    if isinstance(source, bytes):
        return _from_bytes(source, name)
    path = Path(source)
    label = name if name is not None else str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, [_not_regular(path)]
        with _open_regular(path) as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):  # replaced since the first look
                return None, [_not_regular(path)]
            head = fh.read(_HEAD_BYTES)
            if head[: len(PNG_SIGNATURE)] == PNG_SIGNATURE:
                if info.st_size > MAX_PNG_BYTES:
                    return None, [_png_too_large(info.st_size)]
                fh.seek(0)
                return _png_text(read_png_text(fh), label)
            video = _video_kind(head)
            if video is not None:
                fh.seek(0)
                return _video_text(fh, path, video, label)
            if info.st_size > MAX_YAML_BYTES:
                return None, [_yaml_too_large(info.st_size)]
            data = head + fh.read(MAX_YAML_BYTES + 1 - len(head))
    except OSError as exc:
        return None, [Problem("unreadable", f"cannot read workflow file: {exc.strerror or exc}")]
    if len(data) > MAX_YAML_BYTES:  # the file grew while it was read
        return None, [_yaml_too_large(len(data))]
    return SourceText(data, label, "yaml"), []


def read_source(source: Source, name: str | None = None) -> tuple[Workflow | None, list[Problem]]:
    """The workflow in a YAML, PNG or video file (a path, or the file's bytes) and every structural problem.

    Returns ``(workflow, problems)`` as :func:`~dagfusion.workflow.parse_workflow` does (the
    workflow holds whatever could be understood, so registry checks can still run), or
    ``(None, problems)`` when no workflow could be read (see :func:`read_text`).
    """
    found, problems = read_text(source, name)
    if found is None:
        return None, problems
    return parse_workflow(found.text, found.name)


def _from_bytes(data: bytes, name: str | None) -> tuple[SourceText | None, list[Problem]]:
    video = _video_kind(data[:_HEAD_BYTES])
    if video is not None:
        return _video_text(io.BytesIO(data), None, video, name)
    if data.startswith(PNG_SIGNATURE):
        if len(data) > MAX_PNG_BYTES:
            return None, [_png_too_large(len(data))]
        return _png_text(read_png_text(io.BytesIO(data)), name)
    if len(data) > MAX_YAML_BYTES:
        return None, [_yaml_too_large(len(data))]
    return SourceText(data, name, "yaml"), []


def _png_text(chunks: dict[str, str], name: str | None) -> tuple[SourceText | None, list[Problem]]:
    text = chunks.get(WORKFLOW_KEY)
    if text is None:
        return None, [Problem("no-workflow", "this PNG carries no dagfusion workflow")]
    return SourceText(text, name, "png"), []


def _video_kind(head: bytes) -> str | None:
    """``"mp4"``, ``"webp"`` or ``"gif"`` if ``head`` starts like one of those containers."""
    try:
        from dagfusion.nodes.video.containers import sniff
    except ImportError:  # the video pack is not installed: no file is a video
        return None
    return sniff(head)


def _video_text(
    fh: io.BufferedIOBase, path: Path | None, kind: str, name: str | None
) -> tuple[SourceText | None, list[Problem]]:
    """The workflow in a video's embedded metadata or, for a file, its ``NAME.EXT.json`` sidecar."""
    from dagfusion.nodes.video.metadata import read_sidecar, read_video_metadata, sidecar_path

    document = read_video_metadata(fh, sidecar=False)
    if (document is None or "workflow" not in document) and path is not None:
        document = read_sidecar(path)
    if document is None or "workflow" not in document:
        beside = f" (embedded or in {sidecar_path(path).name})" if path is not None else ""
        return None, [Problem("no-workflow", f"this {kind.upper()} carries no dagfusion workflow{beside}")]
    return SourceText(document["workflow"], name, kind), []


def _open_regular(path: Path) -> io.BufferedReader:
    """``path`` opened for reading without blocking, so a FIFO put in its place cannot hang us."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _not_regular(path: Path) -> Problem:
    return Problem("unreadable", f"cannot read workflow file: {path} is not a regular file")


def _yaml_too_large(size: int) -> Problem:
    return Problem("yaml-too-large", f"the file is {size} bytes; the limit is {MAX_YAML_BYTES}")


def _png_too_large(size: int) -> Problem:
    return Problem("png-too-large", f"the picture is {size} bytes; the limit for reading its workflow is {MAX_PNG_BYTES}")


__all__ = ["MAX_PNG_BYTES", "Source", "SourceText", "read_source", "read_text"]
