"""Encoding and decoding video frames: MP4 (H.264) through PyAV, animated WebP and GIF through Pillow.

Frames travel as ``uint8`` arrays ``(F, H, W, C)`` (C = 3, or 4 for WebP with alpha). Writers
raise :class:`FormatUnavailable` naming what is missing when a format cannot be written here
(PyAV not installed, no H.264 encoder, Pillow without WebP); the save node then falls back to
PNG frames. Decoders are called only after the header was checked
(:mod:`~dagfusion.nodes.video.containers`) and check again, frame by frame, that the stream
holds no more and no larger frames than its header declared.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

from dagfusion.nodes.video.containers import VideoHeader, VideoHeaderError

#: Installing the optional dependency that writes and reads MP4.
PYAV_HINT = "install PyAV: pip install 'dagfusion[video]' (or pip install av)"
#: The H.264 encoder used for MP4 (PyAV's wheels bundle it).
H264_ENCODER = "libx264"


class FormatUnavailable(RuntimeError):
    """A video format cannot be written or read in this environment; the message names what is
    missing (a package, a codec, a Pillow feature)."""


def import_av() -> Any:
    """The ``av`` module (PyAV), or :class:`FormatUnavailable` naming how to install it."""
    try:
        import av
    except ImportError as exc:
        raise FormatUnavailable(f"PyAV (the 'av' package) is not installed ({exc}); {PYAV_HINT}") from None
    return av


def to_uint8(clip: Any, keep_alpha: bool) -> Any:
    """One clip ``(F, C, H, W)`` in [0, 1] (C = 1, 3 or 4) as ``uint8`` ``(F, H, W, 3|4)``: gray
    repeated to RGB, alpha kept only when ``keep_alpha``."""
    import numpy as np

    array = clip.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    array = (array * 255.0 + 0.5).astype(np.uint8)
    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4 and not keep_alpha:
        array = array[..., :3]
    return np.ascontiguousarray(array)


# --- writers -------------------------------------------------------------------------------------


def write_mp4(path: str | os.PathLike[str], frames: Any, *, fps: float, crf: int, metadata: str | None, **_: Any) -> None:
    """Write ``frames`` (uint8 ``(F, H, W, 3)``) as H.264 MP4 (yuv420p, ``crf`` 0–51, lower is
    better) at ``fps``, ``metadata`` in the container's ``comment`` tag. An odd width or height
    is padded by one repeated edge pixel (4:2:0 needs even sizes); the metadata's ``width`` and
    ``height`` tell a reader to crop it off.

    :raises FormatUnavailable: PyAV is not installed or has no H.264 encoder.
    """
    import numpy as np

    av = import_av()
    try:
        av.codec.Codec(H264_ENCODER, "w")
    except Exception as exc:  # noqa: BLE001 - PyAV's UnknownCodecError and friends
        raise FormatUnavailable(f"PyAV's FFmpeg has no H.264 encoder ({H264_ENCODER}: {exc})") from None
    frames = frames[..., :3]
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(os.fspath(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        if metadata is not None:
            container.metadata["comment"] = metadata
        stream = container.add_stream(H264_ENCODER, rate=rate, options={"crf": str(int(crf)), "preset": "medium"})
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _pillow_frames(frames: Any) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(frame, mode="RGBA" if frame.shape[-1] == 4 else "RGB") for frame in frames]


def write_webp(
    path: str | os.PathLike[str], frames: Any, *, fps: float, quality: int, loop: int, metadata: str | None, **_: Any
) -> None:
    """Write ``frames`` (uint8 ``(F, H, W, 3|4)``) as an animated WebP (lossy, ``quality``
    0–100; alpha kept), each frame shown ``round(1000 / fps)`` ms, ``loop`` times (0: forever),
    ``metadata`` in an XMP packet.

    :raises FormatUnavailable: Pillow was built without WebP.
    """
    from dagfusion.nodes.video.metadata import xmp_packet
    from PIL import features

    if not features.check("webp"):
        raise FormatUnavailable("Pillow was built without WebP support (libwebp)")
    pictures = _pillow_frames(frames)
    duration = max(1, round(1000.0 / fps))
    options: dict[str, Any] = {"quality": int(quality), "method": 4, "loop": int(loop)}
    if metadata is not None:
        options["xmp"] = xmp_packet(metadata)
    pictures[0].save(os.fspath(path), format="WEBP", save_all=True, append_images=pictures[1:],
                     duration=[duration] * len(pictures), **options)


def write_gif(path: str | os.PathLike[str], frames: Any, *, fps: float, loop: int, metadata: str | None, **_: Any) -> None:
    """Write ``frames`` (uint8 ``(F, H, W, 3)``) as an animated GIF (a 256-colour palette per
    frame; alpha dropped), each frame shown ``1000 / fps`` ms in GIF's 10 ms steps (at least
    10 ms), ``loop`` times (0: forever), ``metadata`` in a comment extension.

    Pillow merges consecutive identical frames into one longer frame; readers get them back
    from the durations and the metadata's frame count.
    """
    pictures = _pillow_frames(frames[..., :3])
    duration = max(10.0, 1000.0 / fps)
    options: dict[str, Any] = {"loop": int(loop)}
    if metadata is not None:
        options["comment"] = metadata.encode("ascii")
    pictures[0].save(os.fspath(path), format="GIF", save_all=True, append_images=pictures[1:],
                     duration=[duration] * len(pictures), **options)


Writer = Callable[..., None]
WRITERS: dict[str, Writer] = {"mp4": write_mp4, "webp": write_webp, "gif": write_gif}
"""Format name → writer; each takes ``(path, frames, *, fps, crf, quality, loop, metadata)``."""


# --- reading -------------------------------------------------------------------------------------


def frame_repeats(header: VideoHeader, frames: int | None) -> list[int] | None:
    """How many frames each stored frame stands for, or ``None`` when each is one frame.

    WebP and GIF writers merge consecutive identical frames into one longer frame. Given the
    clip's frame count as saved (``frames``, from the dagfusion metadata), the stored frames'
    durations are shared out so the counts add up to it exactly (largest remainders, at least 1
    each). Without it, for MP4, or when it cannot be honoured, every stored frame is one frame
    (``None``: no per-frame list is built, however many frames a header declares).
    """
    stored = header.frames
    durations = list(header.durations_ms)
    if frames is None or frames <= stored or len(durations) != stored or sum(durations) <= 0:
        return None
    total = sum(durations)
    ideal = [d * frames / total for d in durations]
    repeats = [max(1, int(x)) for x in ideal]
    left = frames - sum(repeats)
    if left < 0 or left > stored:  # the durations do not fit the count
        return None
    order = sorted(range(stored), key=lambda i: ideal[i] - int(ideal[i]), reverse=True)
    for i in order[:left]:
        repeats[i] += 1
    return repeats if sum(repeats) == frames else None


def decode(path: str | os.PathLike[str], header: VideoHeader, count: int, max_image_pixels: int) -> Iterator[Any]:
    """The first ``count`` stored frames of the video at ``path`` as uint8 ``(H, W, 3)`` arrays,
    in order. ``header`` is the file's checked header.

    :raises VideoHeaderError: the stream holds more frames, or larger ones, than its header
        declares (decoding stops at the first such frame).
    :raises FormatUnavailable: an MP4 file without PyAV.
    """
    if header.format == "mp4":
        yield from _decode_av(path, header, count)
    else:
        yield from _decode_pillow(path, header, count, max_image_pixels)


def _too_large(path: str | os.PathLike[str], header: VideoHeader, width: int, height: int) -> VideoHeaderError:
    return VideoHeaderError(
        f"{os.fspath(path)!r} decodes to {width}×{height} frames, larger than the {header.width}×{header.height} "
        "its header declares; refusing it"
    )


def _decode_av(path: str | os.PathLike[str], header: VideoHeader, count: int) -> Iterator[Any]:
    av = import_av()
    if count <= 0:
        return
    with av.open(os.fspath(path), mode="r") as container:
        if not container.streams.video:
            raise VideoHeaderError(f"{os.fspath(path)!r} has no video stream PyAV can decode")
        for decoded, frame in enumerate(container.decode(video=0), 1):
            if frame.width > header.width or frame.height > header.height:
                raise _too_large(path, header, frame.width, frame.height)
            if decoded > header.frames:
                raise VideoHeaderError(
                    f"{os.fspath(path)!r} holds more frames than the {header.frames} its header declares; refusing it"
                )
            yield frame.to_ndarray(format="rgb24")
            if decoded >= count:
                return


def _decode_pillow(path: str | os.PathLike[str], header: VideoHeader, count: int, max_image_pixels: int) -> Iterator[Any]:
    import numpy as np
    from dagfusion.imagelimits import open_image

    formats = ("WEBP",) if header.format == "webp" else ("GIF",)
    if header.format == "webp":
        from PIL import features

        if not features.check("webp"):
            raise FormatUnavailable("Pillow was built without WebP support (libwebp): it cannot read WebP files")
    with open_image(path, max_image_pixels, formats=formats) as picture:
        for index in range(count):
            try:
                picture.seek(index)
            except EOFError:
                raise VideoHeaderError(
                    f"{os.fspath(path)!r} ends after {index} frames, fewer than its header declares"
                ) from None
            width, height = picture.size
            if width > header.width or height > header.height:
                raise _too_large(path, header, width, height)
            yield np.asarray(picture.convert("RGB"))


__all__ = [
    "H264_ENCODER",
    "PYAV_HINT",
    "WRITERS",
    "FormatUnavailable",
    "decode",
    "frame_repeats",
    "import_av",
    "to_uint8",
    "write_gif",
    "write_mp4",
    "write_webp",
]
