"""ExtractFrames, FramesToVideo and VideoInfo; frame selections; container headers read without decoding."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
import torch
from dagfusion import NodeInputError, ValidationError
from dagfusion.nodes.video import codecs
from dagfusion.nodes.video.containers import VideoHeader, VideoHeaderError, read_header, read_metadata_text, sniff
from dagfusion.nodes.video.metadata import decode_metadata, encode_metadata
from dagfusion.nodes.video.nodes import extract_frames, frames_to_video, parse_selection, select_frames, video_info
from dagfusion.testing import run_workflow

from .clips import context, smooth_clip


def _numbered(clips: int = 2, frames: int = 5) -> torch.Tensor:
    """``(clips, frames, 3, 2, 2)`` whose every value is ``clip * 10 + frame``."""
    values = torch.arange(clips).view(clips, 1) * 10 + torch.arange(frames).view(1, frames)
    return values.view(clips, frames, 1, 1, 1).expand(clips, frames, 3, 2, 2).float().contiguous()


def _ids(images: torch.Tensor) -> list[int]:
    return [int(v) for v in images[:, 0, 0, 0]]


# --- selections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [(":", [0, 1, 2, 3, 4]), ("0, 2:4, -1", [0, 2, 3, 4]), ("::2", [0, 2, 4]), ("-2:", [3, 4]), ("4, 0", [4, 0]),
     ("::-1", [4, 3, 2, 1, 0]), ("1:100", [1, 2, 3, 4])],
)
def test_selections_follow_python_indexing(text: str, expected: list[int]) -> None:
    assert select_frames(text, 5) == expected


@pytest.mark.parametrize(("text", "why"), [("a", "expected an index"), ("1,,2", "empty item"), ("0:4:0", "non-zero"),
                                           ("1.5", "expected an index"), ("5", r"\[-5, 5\)"), ("-6", r"\[-5, 5\)")])
def test_bad_selections_are_named(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        select_frames(text, 5)


def _picture(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path)
    return path


def test_a_bad_constant_selection_is_a_validation_problem(tmp_path: Path) -> None:
    text = f"""format_version: 1
nodes:
  image: {{type: dagfusion.image.LoadImage, inputs: {{path: {_picture(tmp_path)}}}}}
  clip: {{type: dagfusion.video.FramesToVideo, inputs: {{images: {{from: image.image}}}}}}
  pick: {{type: dagfusion.video.ExtractFrames, inputs: {{video: {{from: clip.video}}, frames: "1:x"}}}}
"""
    with pytest.raises(ValidationError) as info:
        run_workflow(text, tmp_path=tmp_path)
    [problem] = info.value.problems
    assert problem.code == "bad-frame-selection" and problem.input == "frames" and "'1:x'" in problem.message
    assert parse_selection("1:3, 7") == [(1, 3, None), 7]


# --- ExtractFrames / FramesToVideo / VideoInfo ---------------------------------------------------


def test_extract_frames_of_one_clip_or_of_every_clip(tmp_path: Path) -> None:
    video = _numbered()
    ctx = context(tmp_path)
    assert _ids(extract_frames.fn(ctx, video=video, frames="0, -1", clip=1)) == [10, 14]
    assert _ids(extract_frames.fn(ctx, video=video, frames="::2", clip=-1)) == [0, 2, 4, 10, 12, 14]
    one_clip = extract_frames.fn(ctx, video=video[0], frames=":", clip=0)  # (F, C, H, W) is one clip
    assert one_clip.shape == (5, 3, 2, 2)


@pytest.mark.parametrize(
    ("inputs", "name", "message"),
    [({"frames": "7", "clip": 0}, "frames", r"\[-5, 5\).*got 7"),
     ({"frames": ":", "clip": 2}, "clip", "below 2.*got 2"),
     ({"frames": "3:1", "clip": 0}, "frames", "at least one"),
     ({"frames": ":", "clip": 0, "video": torch.zeros(3, 4)}, "video", r"expected a VIDEO tensor.*\(3, 4\)")],
)
def test_extract_frames_names_the_input_expected_and_got(tmp_path: Path, inputs: dict, name: str, message: str) -> None:
    with pytest.raises(NodeInputError, match=message) as info:
        extract_frames.fn(context(tmp_path), **{"video": _numbered(), **inputs})
    assert info.value.input == name


def test_frames_to_video_groups_consecutive_frames_and_round_trips_extract(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    video = _numbered(clips=2, frames=3)
    images = extract_frames.fn(ctx, video=video, frames=":", clip=-1)
    again = frames_to_video.fn(ctx, images=images, frames_per_clip=3)
    assert torch.equal(again, video)
    assert frames_to_video.fn(ctx, images=images, frames_per_clip=0).shape == (1, 6, 3, 2, 2)
    with pytest.raises(NodeInputError, match="multiple of frames_per_clip=4, got 6 images") as info:
        frames_to_video.fn(ctx, images=images, frames_per_clip=4)
    assert info.value.input == "frames_per_clip"


def test_video_info_reports_shape_duration_and_values(tmp_path: Path) -> None:
    out = video_info.fn(context(tmp_path), video=_numbered(clips=2, frames=5), fps=2.0)
    assert (out["clips"], out["frames"], out["height"], out["width"]) == (2, 5, 2, 2)
    assert out["info"]["seconds"] == 2.5 and out["info"]["channels"] == 3 and out["info"]["max"] == 14.0


def test_the_nodes_chain_in_a_workflow(tmp_path: Path) -> None:
    text = f"""format_version: 1
nodes:
  image: {{type: dagfusion.image.LoadImage, inputs: {{path: {_picture(tmp_path)}}}}}
  clip: {{type: dagfusion.video.FramesToVideo, inputs: {{images: {{from: image.image}}}}}}
  info: {{type: dagfusion.video.VideoInfo, inputs: {{video: {{from: clip.video}}, fps: 4.0}}}}
  pick: {{type: dagfusion.video.ExtractFrames, inputs: {{video: {{from: clip.video}}, frames: "-1"}}}}
"""
    result = run_workflow(text, tmp_path=tmp_path)
    assert (result.output("info.frames"), result.output("info.height"), result.output("info.width")) == (1, 6, 8)
    assert result.output("pick.images").shape == (1, 3, 6, 8)


# --- headers ---------------------------------------------------------------------------------------


def test_sniff_tells_containers_by_signature() -> None:
    assert sniff(b"\0\0\0\x18ftypisom") == "mp4"
    assert sniff(b"RIFF\0\0\0\0WEBPVP8X") == "webp"
    assert sniff(b"GIF89a\0\0\0\0\0\0") == "gif" and sniff(b"GIF87a\0\0\0\0\0\0") == "gif"
    assert sniff(b"RIFF\0\0\0\0WAVEfmt ") is None and sniff(b"\x89PNG\r\n\x1a\n\0\0\0\0") is None


def _gif(tmp_path: Path) -> Path:
    path = tmp_path / "clip.gif"
    frames = codecs.to_uint8(smooth_clip(frames=4, height=12, width=20)[0], keep_alpha=False)
    codecs.write_gif(path, frames, fps=5.0, loop=0, metadata=encode_metadata({"frames": 4}, "format_version: 1\n"))
    return path


def test_a_gif_header_gives_size_frames_durations_and_metadata(tmp_path: Path) -> None:
    header = read_header(_gif(tmp_path))
    assert (header.format, header.width, header.height, header.frames) == ("gif", 20, 12, 4)
    assert header.durations_ms == (200, 200, 200, 200) and header.fps == pytest.approx(5.0)
    document = decode_metadata(header.metadata)
    assert document is not None and document["workflow"] == "format_version: 1\n"


@pytest.mark.parametrize("keep", [40, 200, 600])
def test_a_cut_short_file_is_damaged_or_holds_fewer_frames_never_more(tmp_path: Path, keep: int) -> None:
    data = _gif(tmp_path).read_bytes()[:keep]
    try:
        header = read_header(io.BytesIO(data))
    except VideoHeaderError as exc:
        assert "GIF" in str(exc)
    else:
        assert header.frames <= 4
    assert read_metadata_text(io.BytesIO(b"GIF89a")) is None  # never raises for the content


def test_an_mp4_header_needs_a_moov_box_and_a_video_track(tmp_path: Path) -> None:
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"isom", 0, b"isom")
    with pytest.raises(VideoHeaderError, match="no 'moov' box"):
        read_header(io.BytesIO(ftyp))
    moov = struct.pack(">I4s", 8, b"moov")
    with pytest.raises(VideoHeaderError, match="no video track"):
        read_header(io.BytesIO(ftyp + moov))
    broken = struct.pack(">I4s", 4000, b"moov")  # longer than the file
    with pytest.raises(VideoHeaderError, match="damaged"):
        read_header(io.BytesIO(ftyp + broken))


def test_an_mp4_header_is_read_without_pyav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("av")
    from .clips import save

    [path] = save(context(tmp_path), smooth_clip(frames=5, height=16, width=32), "mp4", fps=12.0)["paths"]
    monkeypatch.setitem(__import__("sys").modules, "av", None)
    header = read_header(path)
    assert (header.width, header.height, header.frames, header.codec) == (32, 16, 5, "avc1")
    assert header.fps == pytest.approx(12.0) and decode_metadata(header.metadata) is not None


def test_frame_repeats_share_merged_frames_out_by_duration() -> None:
    header = VideoHeader("gif", 8, 8, 3, (370, 120, 250), 8.0, "gif")
    assert codecs.frame_repeats(header, 6) == [3, 1, 2]
    assert codecs.frame_repeats(header, 3) is None and codecs.frame_repeats(header, None) is None
    assert sum(codecs.frame_repeats(header, 1000) or []) == 1000
    uneven = VideoHeader("gif", 8, 8, 3, (1000, 10, 10), 1.0, "gif")
    assert codecs.frame_repeats(uneven, 4) is None  # durations that cannot fit the count: one frame each


@pytest.mark.parametrize("format", ["mp4", "webp", "gif"])
def test_damaged_files_give_a_header_error_or_a_header_and_read_source_never_raises(format: str, tmp_path: Path) -> None:
    import random

    from dagfusion.sources import read_text

    if format == "mp4":
        pytest.importorskip("av")
    from .clips import save

    [path] = save(context(tmp_path), smooth_clip(frames=3, height=16, width=16), format)["paths"]
    original = Path(path).read_bytes()
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(12, len(data))
            data[at] = rng.randrange(256)
        data = data[: rng.randint(12, len(data))] if rng.random() < 0.3 else data
        try:
            header = read_header(io.BytesIO(bytes(data)))
        except VideoHeaderError:
            pass
        else:
            assert header.frames >= 1 and header.width >= 1 and header.height >= 1
        found, problems = read_text(bytes(data))
        assert (found is None) != (problems == [])
