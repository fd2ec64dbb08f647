"""Video container headers read without decoding: MP4 (ISO base media), animated WebP and GIF.

:func:`read_header` walks a file's structure — MP4 boxes, RIFF chunks, GIF blocks — and returns
a :class:`VideoHeader`: the container, the frame size, the number of frames, their durations
and the dagfusion metadata embedded in it (see :mod:`~dagfusion.nodes.video.metadata`). No
pixel is decoded, and only what is needed is read (MP4 sample tables are skipped by seeking), so
a small file declaring an enormous video costs a bounded amount of time and memory. Loaders
check :meth:`VideoHeader.pixels` against ``max_video_pixels`` (:func:`check_video_pixels`)
before anything is decoded.

This module needs neither PyAV nor Pillow, so the workflow embedded in a video can be read
(``dagfusion run clip.mp4``) where neither is installed.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from dagfusion.errors import UnsafeOperationError

#: Most bytes of embedded metadata kept (an MP4 comment, a WebP XMP chunk, a GIF comment).
MAX_METADATA_BYTES = 16 * 1024 * 1024
#: Most MP4 boxes, RIFF chunks or GIF blocks looked at in one file.
MAX_ENTRIES = 1_000_000
#: Most entries of an MP4 time-to-sample table read to find the frame rate.
_STTS_ENTRIES = 4096
#: Deepest MP4 box nesting followed.
MAX_DEPTH = 16

FORMATS = ("mp4", "webp", "gif")
"""Containers this module reads, by the names :func:`sniff` returns."""

Source = str | os.PathLike[str] | IO[bytes]


class VideoHeaderError(ValueError):
    """The file is not a video container this module reads, or its header is damaged."""


class VideoTooLargeError(UnsafeOperationError):
    """A video's header declares more frames × pixels than the settings allow; nothing was decoded."""


@dataclass(frozen=True)
class VideoHeader:
    """What a video container's header declares.

    Attributes:
        format: ``"mp4"``, ``"webp"`` or ``"gif"``.
        width, height: The frame (canvas) size in pixels.
        frames: Frames stored in the container.
        durations_ms: Each stored frame's display time in milliseconds, where the container
            keeps one per frame (WebP, GIF); empty for MP4.
        fps: Frames per second the header implies (MP4: from the most common sample duration;
            WebP/GIF: from the median frame duration), or ``None`` if it cannot tell.
        codec: The MP4 sample entry type (``"avc1"``, ``"hev1"``…); ``"webp"``/``"gif"`` otherwise.
        metadata: The dagfusion metadata text embedded in the file, or ``None``.
    """

    format: str
    width: int
    height: int
    frames: int
    durations_ms: tuple[int, ...] = field(default=(), repr=False)
    fps: float | None = None
    codec: str = ""
    metadata: str | None = field(default=None, repr=False)

    @property
    def pixels(self) -> int:
        """``frames × width × height``: what decoding every frame produces."""
        return self.frames * self.width * self.height


def check_video_pixels(name: str, width: int, height: int, frames: int, max_pixels: int) -> None:
    """Refuse a video of ``frames`` frames of ``width`` × ``height`` if it exceeds ``max_pixels``.

    :raises VideoTooLargeError: naming ``name``, its size, the limit and the setting.
    """
    pixels = frames * width * height
    if pixels > max_pixels:
        raise VideoTooLargeError(
            f"{name} declares {frames:,} frames of {width}×{height} = {pixels:,} pixels, more than the limit of "
            f"{max_pixels:,} pixels; raise max_video_pixels in the settings (or DAGFUSION_MAX_VIDEO_PIXELS), "
            "or load fewer frames (max_frames, stride)"
        )


def sniff(head: bytes) -> str | None:
    """The container whose signature ``head`` (a file's first 12 bytes or more) starts with:
    ``"mp4"``, ``"webp"``, ``"gif"``, or ``None``."""
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def read_header(source: Source) -> VideoHeader:
    """The header of the MP4, WebP or GIF file (or binary stream) ``source``, decoding nothing.

    A stream is read from its current position and left open; a path must be a regular file.

    :raises VideoHeaderError: not one of these containers, no video track, no frame, or a
        damaged structure.
    :raises OSError: the file cannot be read.
    """
    name = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "the stream"
    with _binary(source) as fh:
        start = fh.tell()
        kind = sniff(fh.read(12))
        fh.seek(start)
        try:
            if kind == "mp4":
                return _mp4_header(fh, start)
            if kind == "webp":
                return _webp_header(fh, start)
            if kind == "gif":
                return _gif_header(fh, start)
        except (struct.error, _Truncated) as exc:
            raise VideoHeaderError(f"{name} is a damaged {kind.upper()} file: {exc or 'it ends early'}") from None
        except VideoHeaderError as exc:
            raise VideoHeaderError(f"{name}: {exc}") from None
    raise VideoHeaderError(f"{name} is not an MP4, WebP or GIF file")


def read_metadata_text(source: Source) -> str | None:
    """The dagfusion metadata text embedded in a video file, or ``None``; never raises for the
    file's content (an unreadable, damaged or foreign file gives ``None``)."""
    try:
        return read_header(source).metadata
    except (OSError, ValueError):
        return None


# --- reading -------------------------------------------------------------------------------------


class _Truncated(Exception):
    """The data ends before the structure does."""


class _binary:
    """``source`` as a binary stream: a stream as is (left open), a path opened without blocking
    (only a regular file) and closed on exit."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._owned: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        if hasattr(self._source, "read"):
            return self._source  # type: ignore[return-value]
        path = os.fspath(self._source)  # type: ignore[arg-type]
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path!r} is not a regular file")
            self._owned = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        return self._owned

    def __exit__(self, *exc: object) -> None:
        if self._owned is not None:
            self._owned.close()


def _read(fh: IO[bytes], size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise _Truncated("it ends early")
    return data


def _file_end(fh: IO[bytes]) -> int:
    here = fh.tell()
    end = fh.seek(0, os.SEEK_END)
    fh.seek(here)
    return end


def _median(values: list[int]) -> float | None:
    positive = sorted(v for v in values if v > 0)
    if not positive:
        return None
    middle = len(positive) // 2
    return float(positive[middle]) if len(positive) % 2 else (positive[middle - 1] + positive[middle]) / 2.0


# --- MP4 -----------------------------------------------------------------------------------------

_MP4_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"udta", b"ilst", b"edts",
                             b"mvex", b"moof", b"traf"})


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_ENTRIES

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise VideoHeaderError(f"more than {MAX_ENTRIES:,} boxes")


def _boxes(fh: IO[bytes], start: int, end: int, budget: _Budget) -> Iterator[tuple[bytes, int, int]]:
    """``(type, payload start, payload end)`` of each box between ``start`` and ``end``."""
    position = start
    while position + 8 <= end:
        budget.spend()
        fh.seek(position)
        size, kind = struct.unpack(">I4s", _read(fh, 8))
        header = 8
        if size == 1:
            size = struct.unpack(">Q", _read(fh, 8))[0]
            header = 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            raise VideoHeaderError(f"a damaged {kind!r} box (size {size})")
        yield kind, position + header, position + size
        position += size


@dataclass
class _Track:
    track_id: int = 0
    handler: bytes = b""
    width: int = 0
    height: int = 0
    coded_width: int = 0
    coded_height: int = 0
    codec: str = ""
    samples: int = 0
    timescale: int = 0
    delta: int = 0


def _mp4_header(fh: IO[bytes], start: int) -> VideoHeader:
    end = _file_end(fh)
    budget = _Budget()
    tracks: list[_Track] = []
    fragments: dict[int, int] = {}
    comment: str | None = None
    seen_moov = False
    for kind, payload, stop in _boxes(fh, start, end, budget):
        if kind == b"moov":
            seen_moov = True
            found, comment = _moov(fh, payload, stop, budget)
            tracks += found
        elif kind == b"moof":
            _moof(fh, payload, stop, budget, fragments)
    if not seen_moov:
        raise VideoHeaderError("the MP4 file has no 'moov' box (it may be cut short)")
    video = next((t for t in tracks if t.handler == b"vide"), None)
    if video is None:
        raise VideoHeaderError("the MP4 file has no video track")
    if video.coded_width > 0 and video.coded_height > 0:  # the size frames decode to (tkhd's is the display size)
        video.width, video.height = video.coded_width, video.coded_height
    frames = video.samples + fragments.get(video.track_id, 0)
    if frames <= 0:
        raise VideoHeaderError("the MP4 video track has no frames")
    if video.width <= 0 or video.height <= 0:
        raise VideoHeaderError(f"the MP4 video track declares no frame size ({video.width}×{video.height})")
    fps = None
    if video.timescale > 0 and video.delta > 0:
        fps = video.timescale / video.delta
    return VideoHeader("mp4", video.width, video.height, frames, (), fps, video.codec, comment)


def _moov(fh: IO[bytes], start: int, end: int, budget: _Budget) -> tuple[list[_Track], str | None]:
    tracks = []
    comment = None
    for kind, payload, stop in _boxes(fh, start, end, budget):
        if kind == b"trak":
            track = _Track()
            _walk_track(fh, payload, stop, budget, track, 1)
            tracks.append(track)
        elif kind == b"udta":
            comment = _udta_comment(fh, payload, stop, budget) or comment
    return tracks, comment


def _walk_track(fh: IO[bytes], start: int, end: int, budget: _Budget, track: _Track, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise VideoHeaderError("MP4 boxes nested too deep")
    for kind, payload, stop in _boxes(fh, start, end, budget):
        if kind in _MP4_CONTAINERS:
            _walk_track(fh, payload, stop, budget, track, depth + 1)
            continue
        fh.seek(payload)
        if kind == b"tkhd":
            version = _read(fh, 1)[0]
            fh.seek(payload + 4 + (8 if version == 0 else 16))
            track.track_id = struct.unpack(">I", _read(fh, 4))[0]
            fh.seek(payload + (76 if version == 0 else 88))
            width, height = struct.unpack(">II", _read(fh, 8))
            track.width, track.height = width >> 16, height >> 16
        elif kind == b"mdhd":
            version = _read(fh, 1)[0]
            fh.seek(payload + (12 if version == 0 else 20))
            track.timescale = struct.unpack(">I", _read(fh, 4))[0]
        elif kind == b"stts":
            fh.seek(payload + 4)
            entries = min(struct.unpack(">I", _read(fh, 4))[0], _STTS_ENTRIES, (stop - payload - 8) // 8)
            table = struct.unpack(f">{2 * entries}I", _read(fh, 8 * entries))
            counts: dict[int, int] = {}
            for count, delta in zip(table[::2], table[1::2], strict=True):
                counts[delta] = counts.get(delta, 0) + count
            track.delta = max(counts, key=lambda d: counts[d]) if counts else 0
        elif kind == b"hdlr":
            fh.seek(payload + 8)
            track.handler = _read(fh, 4)
        elif kind == b"stsd":
            fh.seek(payload + 8)
            _size, entry = struct.unpack(">I4s", _read(fh, 8))
            track.codec = entry.decode("latin-1", "replace").strip()
            fh.seek(payload + 8 + 8 + 24)
            width, height = struct.unpack(">HH", _read(fh, 4))
            track.coded_width, track.coded_height = width, height
        elif kind in (b"stsz", b"stz2"):
            fh.seek(payload + 8)
            track.samples = struct.unpack(">I", _read(fh, 4))[0]


def _moof(fh: IO[bytes], start: int, end: int, budget: _Budget, counts: dict[int, int]) -> None:
    for kind, payload, stop in _boxes(fh, start, end, budget):
        if kind != b"traf":
            continue
        track_id = 0
        samples = 0
        for inner, inner_payload, _ in _boxes(fh, payload, stop, budget):
            if inner == b"tfhd":
                fh.seek(inner_payload + 4)
                track_id = struct.unpack(">I", _read(fh, 4))[0]
            elif inner == b"trun":
                fh.seek(inner_payload + 4)
                samples += struct.unpack(">I", _read(fh, 4))[0]
        counts[track_id] = counts.get(track_id, 0) + samples


def _udta_comment(fh: IO[bytes], start: int, end: int, budget: _Budget) -> str | None:
    """The text of ``udta/meta/ilst/©cmt/data`` (what FFmpeg writes for the ``comment`` tag)."""
    for kind, payload, stop in _boxes(fh, start, end, budget):
        if kind != b"meta":
            continue
        fh.seek(payload + 4)
        # ISO 'meta' is a full box (4 bytes of version and flags before its children); QuickTime's is not
        children = payload if _read(fh, 4) == b"hdlr" else payload + 4
        for inner, inner_payload, inner_stop in _boxes(fh, children, stop, budget):
            if inner != b"ilst":
                continue
            for item, item_payload, item_stop in _boxes(fh, inner_payload, inner_stop, budget):
                if item != b"\xa9cmt":
                    continue
                for data_kind, data_payload, data_stop in _boxes(fh, item_payload, item_stop, budget):
                    if data_kind == b"data" and 0 <= data_stop - data_payload - 8 <= MAX_METADATA_BYTES:
                        fh.seek(data_payload + 8)
                        raw = _read(fh, data_stop - data_payload - 8)
                        try:
                            return raw.decode("utf-8")
                        except UnicodeDecodeError:
                            return None
    return None


# --- WebP ----------------------------------------------------------------------------------------

_XMP_METADATA = re.compile(rb"<dagfusion:metadata>([^<]*)</dagfusion:metadata>")


def _webp_header(fh: IO[bytes], start: int) -> VideoHeader:
    _riff, size, _webp = struct.unpack("<4sI4s", _read(fh, 12))
    end = min(start + 8 + size, _file_end(fh))
    position = start + 12
    width = height = 0
    frames = 0
    durations: list[int] = []
    metadata = None
    entries = 0
    while position + 8 <= end:
        entries += 1
        if entries > MAX_ENTRIES:
            raise VideoHeaderError(f"more than {MAX_ENTRIES:,} chunks")
        fh.seek(position)
        kind, length = struct.unpack("<4sI", _read(fh, 8))
        payload = position + 8
        if payload + length > end:
            raise VideoHeaderError(f"a damaged {kind!r} chunk (length {length})")
        if kind == b"VP8X":
            data = _read(fh, 10)
            width = 1 + int.from_bytes(data[4:7], "little")
            height = 1 + int.from_bytes(data[7:10], "little")
        elif kind == b"ANMF":
            data = _read(fh, 16)
            frames += 1
            durations.append(int.from_bytes(data[12:15], "little"))
        elif kind == b"VP8 " and frames == 0 and width == 0:
            data = _read(fh, 10)
            if data[3:6] != b"\x9d\x01\x2a":
                raise VideoHeaderError("a damaged VP8 frame header")
            w, h = struct.unpack("<HH", data[6:10])
            width, height, frames = w & 0x3FFF, h & 0x3FFF, 1
        elif kind == b"VP8L" and frames == 0 and width == 0:
            data = _read(fh, 5)
            if data[0] != 0x2F:
                raise VideoHeaderError("a damaged VP8L frame header")
            bits = int.from_bytes(data[1:5], "little")
            width, height, frames = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF), 1
        elif kind == b"XMP " and length <= MAX_METADATA_BYTES:
            found = _XMP_METADATA.search(_read(fh, length))
            if found is not None:
                metadata = _xml_unescape(found.group(1).decode("utf-8", "replace"))
        position = payload + length + (length & 1)
    if frames <= 0 or width <= 0 or height <= 0:
        raise VideoHeaderError("the WebP file holds no frame")
    median = _median(durations)
    return VideoHeader("webp", width, height, frames, tuple(durations), 1000.0 / median if median else None,
                       "webp", metadata)


def _xml_unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'").replace("&amp;", "&")


# --- GIF -----------------------------------------------------------------------------------------


def _gif_header(fh: IO[bytes], start: int) -> VideoHeader:
    data = _read(fh, 13)
    width, height, flags = struct.unpack("<HHB", data[6:11])
    if flags & 0x80:
        fh.seek(3 * 2 ** ((flags & 7) + 1), os.SEEK_CUR)
    frames = 0
    durations: list[int] = []
    delay = 0
    comment: bytes | None = None
    entries = 0
    while True:
        entries += 1
        if entries > MAX_ENTRIES:
            raise VideoHeaderError(f"more than {MAX_ENTRIES:,} blocks")
        introducer = fh.read(1)
        if not introducer or introducer == b"\x3b":
            break
        if introducer == b"\x21":
            label = _read(fh, 1)
            if label == b"\xf9":
                block = _sub_blocks(fh, keep=16)
                if len(block) >= 3:
                    delay = 10 * struct.unpack("<H", block[1:3])[0]
            elif label == b"\xfe" and comment is None:
                comment = _sub_blocks(fh, keep=MAX_METADATA_BYTES)
            else:
                _sub_blocks(fh, keep=0)
        elif introducer == b"\x2c":
            left, top, w, h, local = struct.unpack("<HHHHB", _read(fh, 9))
            if local & 0x80:
                fh.seek(3 * 2 ** ((local & 7) + 1), os.SEEK_CUR)
            _read(fh, 1)  # LZW minimum code size
            _sub_blocks(fh, keep=0)
            frames += 1
            durations.append(delay)
            delay = 0
            width, height = max(width, left + w), max(height, top + h)
        else:
            break  # what follows is not a GIF block: stop where a decoder would
    if frames <= 0 or width <= 0 or height <= 0:
        raise VideoHeaderError("the GIF file holds no frame")
    median = _median(durations)
    metadata = comment.decode("latin-1") if comment else None
    return VideoHeader("gif", width, height, frames, tuple(durations), 1000.0 / median if median else None,
                       "gif", metadata)


def _sub_blocks(fh: IO[bytes], keep: int) -> bytes:
    """Read a chain of GIF data sub-blocks, keeping at most ``keep`` bytes of their data
    (``keep`` over the bound: the text is dropped, not truncated)."""
    kept: list[bytes] = []
    total = 0
    while True:
        size = _read(fh, 1)[0]
        if size == 0:
            break
        if total + size <= keep:
            kept.append(_read(fh, size))
        else:
            fh.seek(size, os.SEEK_CUR)
            if keep >= MAX_METADATA_BYTES:
                kept = []
                keep = -1
        total += size
    return b"".join(kept)


__all__ = [
    "FORMATS", "MAX_ENTRIES", "MAX_METADATA_BYTES", "VideoHeader", "VideoHeaderError", "VideoTooLargeError",
    "check_video_pixels", "read_header", "read_metadata_text", "sniff",
]
