"""The nodes of the video pack: SaveVideo, LoadVideo, ExtractFrames, FramesToVideo and VideoInfo."""

from __future__ import annotations

import bisect
import itertools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dagfusion import (
    BOOLEAN,
    DICT,
    FLOAT,
    INT,
    LIST,
    PATH,
    STRING,
    Input,
    NodeInputError,
    Output,
    Problem,
    RunContext,
    UnsafeOperationError,
    node,
)
from dagfusion.nodes.diffusion.types import IMAGE, VIDEO

_COLOR = "#4db6ac"
FORMATS = ("mp4", "webp", "gif")
"""What SaveVideo writes (LoadVideo reads the same three containers)."""
_FALLBACK = "png"


# --- shared --------------------------------------------------------------------------------------


def _example_video(frames: int = 6, height: int = 16, width: int = 24, clips: int = 1) -> Any:
    """A deterministic moving-gradient video ``(clips, frames, 3, height, width)`` (node examples)."""
    import torch

    y = torch.linspace(0, 1, height).view(1, 1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, width)
    t = torch.linspace(0, 1, frames).view(frames, 1, 1, 1)
    red = (x + 0.5 * t).remainder(1.0).expand(frames, 1, height, width)
    green = y.expand(frames, 1, height, width)
    blue = (0.25 + 0.5 * t).expand(frames, 1, height, width)
    clip = torch.cat([red, green, blue], dim=1)
    return torch.stack([clip * (0.6 + 0.4 * c / max(1, clips)) for c in range(clips)]).contiguous()


def _clips(video: Any, input_name: str = "video") -> Any:
    """``video`` as ``(B, F, C, H, W)``: a ``(F, C, H, W)`` tensor is one clip."""
    import torch

    if not isinstance(video, torch.Tensor):
        raise NodeInputError(input_name, f"expected a VIDEO tensor (B, F, C, H, W), got {type(video).__name__}")
    if video.ndim == 4:
        video = video.unsqueeze(0)
    if video.ndim != 5:
        raise NodeInputError(input_name, f"expected a VIDEO tensor (B, F, C, H, W), got shape {tuple(video.shape)}")
    if min(video.shape) == 0:
        raise NodeInputError(input_name, f"expected at least one frame of at least one pixel, got shape {tuple(video.shape)}")
    return video


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _warn(ctx: RunContext, message: str) -> None:
    """A warning that does not stop the run: in the node's log and as a ``RunWarning`` event."""
    from dagfusion import RunWarning

    ctx.logger.warning("node '%s': %s", ctx.node_id, message)
    handler = getattr(ctx, "handler", None)
    if handler is not None:
        handler.handle(RunWarning(ctx.run_id, node_id=ctx.node_id, message=message))


# --- SaveVideo -----------------------------------------------------------------------------------


def _save_example(format: str) -> Any:
    def make() -> dict[str, Any]:
        return {"video": _example_video(), "format": format, "filename_prefix": f"clips/example-{format}", "fps": 6.0}

    return make


def _png_frames(
    ctx: RunContext, prefix: str, index: int, frames: Any, workflow: str | None, manifest: dict[str, Any] | None
) -> list[str]:
    """Write one clip's frames as ``PREFIX_CCCCC_FFFFF.png`` (workflow embedded when given)."""
    from dagfusion.pngmeta import png_info
    from PIL import Image

    paths = []
    for f, frame in enumerate(frames):
        path = ctx.output_path(f"{prefix}_{index:05d}_{f:05d}.png")
        info = None
        if workflow is not None:
            frame_manifest = {**(manifest or {})}
            frame_manifest["video"] = {**frame_manifest.get("video", {}), "frame": f}
            info = png_info(workflow, frame_manifest)
        Image.fromarray(frame).save(path, format="PNG", pnginfo=info)
        paths.append(str(path))
    return paths


def _free_index(ctx: RunContext, prefix: str, ext: str, start: int) -> tuple[int, Path]:
    """The first clip number from ``start`` whose video file and first PNG frame are both unused."""
    index = start
    while True:
        path = ctx.output_path(f"{prefix}_{index:05d}.{ext}")
        if not path.exists() and not path.with_name(f"{path.name[:-len(ext) - 1]}_00000.png").exists():
            return index, path
        index += 1


@node(
    "dagfusion.video.SaveVideo",
    version="1.0.0",
    category="video",
    inputs=[
        Input("video", VIDEO, link_only=True, description="Clips (B, F, C, H, W) in [0, 1], C = 1, 3 or 4; one file each."),
        Input("filename_prefix", STRING, "dagfusion",
              description="File names are PREFIX_00000.EXT, ... inside the run's output folder (subfolders allowed)."),
        Input("format", STRING, "mp4", choices=FORMATS,
              description="mp4 (H.264, needs PyAV), webp (animated, lossy) or gif (256 colours per frame)."),
        Input("fps", FLOAT, 8.0, exclusive_min=0.0, max=240.0, description="Frames per second."),
        Input("crf", INT, 18, min=0, max=51, description="MP4 only: H.264 constant rate factor (0 best, 51 worst)."),
        Input("quality", INT, 90, min=0, max=100, description="WebP only: lossy quality (100 best)."),
        Input("loop", INT, 0, min=0, max=65535, description="WebP and GIF: times to play (0: forever)."),
        Input("embed_workflow", BOOLEAN, True,
              description="Store the workflow and manifest in the file (or a NAME.EXT.json sidecar) so "
                          "'dagfusion run clip.mp4' can re-run it."),
    ],
    outputs=[
        Output("paths", LIST, "Paths of the written videos (or, after a fallback, PNG frames)."),
        Output("format", STRING, "What was written: the format asked for, or 'png' if any clip fell back to PNG frames."),
    ],
    pure=False,
    output_node=True,
    examples=[_save_example("mp4"), _save_example("webp"), _save_example("gif")],
    ui={"color": _COLOR},
)
def save_video(
    ctx: RunContext, video: Any, filename_prefix: str, format: str, fps: float, crf: int, quality: int, loop: int,
    embed_workflow: bool,
) -> dict[str, Any]:
    """Save each clip as an MP4, animated WebP or GIF file in the run's output folder, with the
    workflow and a reproducibility manifest embedded (MP4: the ``comment`` tag; WebP: XMP;
    GIF: a comment) or, where the container could not keep it, in a ``NAME.EXT.json`` sidecar.

    A format that cannot be written here (PyAV not installed, no H.264 encoder, Pillow without
    WebP) or whose writer fails does not lose the result: that clip's frames are saved as
    ``PREFIX_CCCCC_FFFFF.png`` (workflow embedded) with a warning naming what was missing.
    """
    from dagfusion.nodes.video import codecs
    from dagfusion.nodes.video.metadata import encode_metadata, read_video_metadata, write_sidecar

    clips = _clips(video)
    if format not in FORMATS:
        raise NodeInputError("format", f"expected one of {list(FORMATS)}, got {format!r}")
    if not filename_prefix.strip():
        raise NodeInputError("filename_prefix", "expected a non-empty file name prefix, got an empty one")
    if clips.shape[2] not in (1, 3, 4):
        raise NodeInputError("video", f"expected 1, 3 or 4 channels, got shape {tuple(clips.shape)}")
    workflow = str(ctx.provenance.get("workflow") or "") if embed_workflow else None
    base_manifest = _plain(ctx.provenance.get("manifest") or {})
    count, frames_per_clip, channels, height, width = (int(n) for n in clips.shape)
    paths: list[str] = []
    unavailable: str | None = None
    fell_back = False
    index = 0
    for b in range(count):
        ctx.check_cancelled()
        frames = codecs.to_uint8(clips[b], keep_alpha=format == "webp")
        index, path = _free_index(ctx, filename_prefix, format, index)
        described = {
            "node": ctx.node_id, "clip": b, "clips": count, "frames": frames_per_clip, "fps": float(fps),
            "width": width, "height": height, "channels": channels, "format": format, "file": path.name,
        }
        manifest = {**base_manifest, "video": described} if embed_workflow else None
        metadata = encode_metadata(described, workflow, manifest)
        reason = unavailable
        if reason is None:
            try:
                codecs.WRITERS[format](path, frames, fps=float(fps), crf=crf, quality=quality, loop=loop, metadata=metadata)
            except codecs.FormatUnavailable as exc:
                reason = unavailable = str(exc)
            except Exception as exc:  # noqa: BLE001 - a writer failing on this clip: keep its frames rather than lose them
                reason = f"writing {format} failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            path.unlink(missing_ok=True)
            fallback = {**described, "format": _FALLBACK, "requested_format": format, "fallback_reason": reason}
            written = _png_frames(ctx, filename_prefix, index, frames, workflow, {**base_manifest, "video": fallback})
            _warn(ctx, f"could not write {path.name} as {format}: {reason}; saved its {frames_per_clip} frames as "
                       f"PNG files instead ({Path(written[0]).name} …)")
            paths += written
            fell_back = True
        else:
            if read_video_metadata(path, sidecar=False) != _decoded(metadata):
                write_sidecar(path, metadata)
            paths.append(str(path))
        _preview(ctx, frames[0], path.name)
        index += 1
    return {"paths": paths, "format": _FALLBACK if fell_back else format}


def _decoded(metadata: str) -> dict[str, Any] | None:
    from dagfusion.nodes.video.metadata import decode_metadata

    return decode_metadata(metadata)


def _preview(ctx: RunContext, frame: Any, label: str) -> None:
    from PIL import Image

    ctx.preview(Image.fromarray(frame), label=label)


# --- LoadVideo -----------------------------------------------------------------------------------


def _load_example(format: str) -> Any:
    def make(folder: Path) -> dict[str, Any]:
        from dagfusion.nodes.video import codecs

        folder.mkdir(parents=True, exist_ok=True)
        frames = codecs.to_uint8(_example_video()[0], keep_alpha=False)
        chosen = format
        if format == "mp4":
            try:
                codecs.import_av()
            except codecs.FormatUnavailable:
                chosen = "gif"  # the contract still runs the node where PyAV is missing
        path = folder / f"example.{chosen}"
        codecs.WRITERS[chosen](path, frames, fps=6.0, crf=18, quality=90, loop=0, metadata=None)
        return {"path": str(path), "max_frames": 4, "stride": 1}

    return make


@node(
    "dagfusion.video.LoadVideo",
    version="1.0.0",
    category="video",
    inputs=[
        Input("path", PATH, description="An MP4, WebP or GIF file under the allowed read folders."),
        Input("start_frame", INT, 0, min=0, description="First frame to load (0: the first)."),
        Input("max_frames", INT, 0, min=0, description="Most frames to load (0: all)."),
        Input("stride", INT, 1, min=1, description="Load every STRIDE-th frame from start_frame."),
    ],
    outputs=[
        Output("video", VIDEO, "The loaded frames as (1, F, 3, H, W) in [0, 1]."),
        Output("fps", FLOAT, "Frames per second of the loaded frames (the file's rate divided by stride)."),
        Output("frame_count", INT, "Frames loaded (F)."),
    ],
    examples=[_load_example("mp4"), _load_example("webp"), _load_example("gif")],
    ui={"color": _COLOR},
)
def load_video(ctx: RunContext, path: str, start_frame: int, max_frames: int, stride: int) -> dict[str, Any]:
    """Load frames of an MP4 (any codec PyAV decodes), animated WebP or GIF file.

    The container's header is read first, decoding nothing: the frames that would be decoded
    times the frame size must be within the settings' max_video_pixels (and a WebP/GIF canvas
    within max_image_pixels), else the file is refused before any frame is decoded. Decoding
    then stops at the last frame asked for, and refuses a stream holding more or larger
    frames than its header declared. Frames a WebP/GIF writer merged (identical neighbours)
    are restored from the dagfusion metadata's frame count. Alpha is dropped.
    """
    import numpy as np
    import torch
    from dagfusion.nodes.video import codecs
    from dagfusion.nodes.video.containers import VideoHeaderError, check_video_pixels, read_header
    from dagfusion.nodes.video.metadata import decode_metadata, read_sidecar, sidecar_path

    resolved = ctx.input_path(path)
    if not resolved.is_file():
        raise NodeInputError("path", f"expected a video file, but {str(resolved)!r} does not exist")
    try:
        header = read_header(resolved)
    except VideoHeaderError as exc:
        raise NodeInputError("path", f"expected an MP4, WebP or GIF video, got: {exc}") from None
    document = decode_metadata(header.metadata)
    if document is None and _readable(ctx, sidecar_path(resolved)):
        document = read_sidecar(resolved)
    described = document["video"] if document is not None else {}
    saved_frames = described.get("frames") if isinstance(described.get("frames"), int) else None
    repeats = codecs.frame_repeats(header, saved_frames)
    ends = list(itertools.accumulate(repeats)) if repeats is not None else None
    total = ends[-1] if ends is not None else header.frames
    if start_frame >= total:
        raise NodeInputError("start_frame", f"expected a frame index below the video's {total} frames, got {start_frame}")
    wanted = range(start_frame, total, stride)
    if max_frames:
        wanted = wanted[:max_frames]

    def stored_of(logical: int) -> int:
        return logical if ends is None else bisect.bisect_right(ends, logical)

    decoded = stored_of(wanted[-1]) + 1
    check_video_pixels(repr(str(resolved)), header.width, header.height, max(decoded, len(wanted)),
                       ctx.settings.max_video_pixels)
    needed: dict[int, list[int]] = {}
    for position, logical in enumerate(wanted):
        needed.setdefault(stored_of(logical), []).append(position)
    out: list[Any] = [None] * len(wanted)
    crop_w, crop_h = described.get("width"), described.get("height")
    try:
        for stored, frame in enumerate(codecs.decode(resolved, header, decoded, ctx.settings.max_image_pixels)):
            ctx.check_cancelled()
            if _padded(frame, crop_w, crop_h):
                frame = frame[:crop_h, :crop_w]  # the edge an MP4 writer added to an odd size
            for position in needed.get(stored, ()):
                out[position] = frame
    except codecs.FormatUnavailable as exc:
        raise codecs.FormatUnavailable(f"cannot read {resolved.name}: {exc}") from None
    except VideoHeaderError as exc:
        raise NodeInputError("path", str(exc)) from None
    if any(frame is None for frame in out):
        raise NodeInputError("path", f"expected {decoded} frames in {resolved.name}, but fewer could be decoded")
    sizes = {frame.shape for frame in out}
    if len(sizes) != 1:
        raise NodeInputError("path", f"expected frames of one size, got {sorted(sizes)}")
    array = np.stack(out).astype(np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).unsqueeze(0).contiguous()
    fps = described.get("fps") if isinstance(described.get("fps"), (int, float)) else None
    fps = float(fps or header.fps or _av_rate(resolved, header) or 10.0)
    return {"video": tensor, "fps": fps / stride, "frame_count": len(wanted)}


def _padded(frame: Any, width: Any, height: Any) -> bool:
    """Whether ``frame`` is one pixel wider and/or taller than the saved ``width`` × ``height``."""
    if not (isinstance(width, int) and isinstance(height, int)):
        return False
    extra_h, extra_w = frame.shape[0] - height, frame.shape[1] - width
    return extra_h in (0, 1) and extra_w in (0, 1) and (extra_h or extra_w) > 0


def _readable(ctx: RunContext, path: Path) -> bool:
    """Whether ``path`` exists and lies in the allowed read folders."""
    try:
        return ctx.input_path(path).is_file()
    except (OSError, UnsafeOperationError):
        return False


def _av_rate(path: Path, header: Any) -> float | None:
    """PyAV's average frame rate of an MP4 whose header gave none."""
    if header.format != "mp4":
        return None
    from dagfusion.nodes.video.codecs import import_av

    av = import_av()
    with av.open(os.fspath(path), mode="r") as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else None


# --- ExtractFrames -------------------------------------------------------------------------------

_ITEM = re.compile(r"^\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?)?$")


def parse_selection(text: str) -> list[tuple[int | None, int | None, int | None] | int]:
    """A frame selection: comma-separated indices (``3``, ``-1``) and Python slices (``0:8:2``,
    ``:``, ``-4:``). Returns ints and ``(start, stop, step)`` triples.

    :raises ValueError: naming the item that is neither, or a zero step.
    """
    items: list[tuple[int | None, int | None, int | None] | int] = []
    for raw in text.split(","):
        if not raw.strip():
            raise ValueError(f"expected indices or start:stop:step slices separated by commas, got an empty item in {text!r}")
        match = _ITEM.match(raw)
        if match is None:
            raise ValueError(f"expected an index (3, -1) or a slice (0:8:2, :), got {raw.strip()!r}")
        if ":" not in raw:
            items.append(int(match.group(1)))
            continue
        start, stop, step = (int(g) if g is not None else None for g in match.groups())
        if step == 0:
            raise ValueError(f"expected a non-zero slice step, got {raw.strip()!r}")
        items.append((start, stop, step))
    return items


def select_frames(text: str, count: int) -> list[int]:
    """The frame indices ``text`` selects from ``count`` frames, in order (see :func:`parse_selection`).

    :raises ValueError: a malformed selection, or an index outside ``[-count, count)``.
    """
    chosen: list[int] = []
    for item in parse_selection(text):
        if isinstance(item, int):
            if not -count <= item < count:
                raise ValueError(f"expected frame indices in [{-count}, {count}) for a clip of {count} frames, got {item}")
            chosen.append(item % count)
        else:
            chosen += range(count)[slice(*item)]
    return chosen


def _check_frames(values: Mapping[str, Any]) -> Iterable[Problem]:
    text = values.get("frames")
    if isinstance(text, str):
        try:
            parse_selection(text)
        except ValueError as exc:
            yield Problem("bad-frame-selection", str(exc), input="frames")


@node(
    "dagfusion.video.ExtractFrames",
    version="1.0.0",
    category="video",
    inputs=[
        Input("video", VIDEO, link_only=True, description="Clips (B, F, C, H, W)."),
        Input("frames", STRING, ":", description="Frames to take: indices and slices, e.g. '0, 4, -1' or '0:16:2' (':' all)."),
        Input("clip", INT, 0, min=-1, description="Which clip (0: the first; -1: every clip, one after another)."),
    ],
    outputs=[Output("images", IMAGE, "The selected frames as an image batch (N, C, H, W).")],
    examples=[lambda: {"video": _example_video(clips=2), "frames": "0, 2:5, -1"},
              lambda: {"video": _example_video(clips=2), "frames": "::2", "clip": -1}],
    check=_check_frames,
    ui={"color": _COLOR},
)
def extract_frames(ctx: RunContext, video: Any, frames: str, clip: int) -> Any:
    """Take frames of a clip (or of every clip) as an IMAGE batch, in the order selected."""
    import torch

    clips = _clips(video)
    count = int(clips.shape[1])
    if clip >= clips.shape[0]:
        raise NodeInputError("clip", f"expected a clip index below {clips.shape[0]} (or -1 for all), got {clip}")
    try:
        indices = select_frames(frames, count)
    except ValueError as exc:
        raise NodeInputError("frames", str(exc)) from None
    if not indices:
        raise NodeInputError("frames", f"expected a selection of at least one of the {count} frames, got {frames!r} (none)")
    chosen = range(clips.shape[0]) if clip == -1 else [clip]
    index = torch.tensor(indices, dtype=torch.long)
    return torch.cat([clips[c].index_select(0, index) for c in chosen]).float().contiguous()


# --- FramesToVideo -------------------------------------------------------------------------------


@node(
    "dagfusion.video.FramesToVideo",
    version="1.0.0",
    category="video",
    inputs=[
        Input("images", IMAGE, link_only=True, description="Frames (N, C, H, W) in order."),
        Input("frames_per_clip", INT, 0, min=0,
              description="Frames in each clip; N must be a multiple of it (0: all N frames in one clip)."),
    ],
    outputs=[Output("video", VIDEO, "The clips (N / frames_per_clip, frames_per_clip, C, H, W).")],
    examples=[lambda: {"images": _example_video(frames=6)[0]},
              lambda: {"images": _example_video(frames=6)[0], "frames_per_clip": 3}],
    ui={"color": _COLOR},
)
def frames_to_video(ctx: RunContext, images: Any, frames_per_clip: int) -> Any:
    """Group an image batch into clips of ``frames_per_clip`` consecutive frames."""
    import torch

    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NodeInputError("images", f"expected an IMAGE batch (N, C, H, W), got {shape}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    total = int(images.shape[0])
    per_clip = frames_per_clip or total
    if total % per_clip:
        raise NodeInputError(
            "frames_per_clip", f"expected a batch whose size is a multiple of frames_per_clip={per_clip}, got {total} images"
        )
    return images.reshape(total // per_clip, per_clip, *images.shape[1:]).float().contiguous()


# --- VideoInfo -----------------------------------------------------------------------------------


@node(
    "dagfusion.video.VideoInfo",
    version="1.0.0",
    category="video",
    inputs=[
        Input("video", VIDEO, link_only=True, description="Clips (B, F, C, H, W)."),
        Input("fps", FLOAT, 8.0, exclusive_min=0.0, description="Frames per second, for the duration."),
    ],
    outputs=[
        Output("clips", INT, "B."),
        Output("frames", INT, "F, frames per clip."),
        Output("height", INT, "H."),
        Output("width", INT, "W."),
        Output("info", DICT, "clips, frames, channels, height, width, fps, seconds, and min/max/mean of the values."),
    ],
    examples=[lambda: {"video": _example_video(clips=2), "fps": 12.0}],
    ui={"color": _COLOR},
)
def video_info(ctx: RunContext, video: Any, fps: float) -> dict[str, Any]:
    """The shape of a VIDEO, its duration at ``fps`` and the range of its values."""
    clips = _clips(video)
    count, frames, channels, height, width = (int(n) for n in clips.shape)
    values = clips.detach().float()
    info = {
        "clips": count, "frames": frames, "channels": channels, "height": height, "width": width,
        "fps": float(fps), "seconds": frames / float(fps),
        "min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()),
    }
    return {"clips": count, "frames": frames, "height": height, "width": width, "info": info}


NODES = (save_video, load_video, extract_frames, frames_to_video, video_info)
"""Every node of the pack, in palette order."""
