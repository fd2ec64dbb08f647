"""SaveVideo and LoadVideo: round trips per format, the header check before decoding, confinement,
the PNG fallback, the embedded workflow (and its sidecar) read back."""

from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path

import pytest
import torch
from dagfusion import NodeInputError, RunWarning, UnsafeOperationError, ValidationError
from dagfusion.nodes.video import codecs
from dagfusion.nodes.video.containers import VideoTooLargeError, read_header
from dagfusion.nodes.video.metadata import read_video_metadata, sidecar_path
from dagfusion.pngmeta import read_png_text
from dagfusion.sources import read_source, read_text
from dagfusion.testing import run_workflow

from .clips import WORKFLOW, context, load, save, smooth_clip

#: Mean / largest absolute error (values in [0, 1]) allowed after a round trip of smooth_clip(),
#: about twice what was measured (Pillow 12.3, PyAV 18.1 with libx264, crf 18, WebP quality 90):
#: MP4 0.0074 / 0.076 (48×64), 0.0090 / 0.121 (33×47, padded to even and cropped back);
#: WebP 0.0066 / 0.068 and 0.0076 / 0.066; GIF (palette per frame) 0.0088 / 0.083 and 0.0084 / 0.087.
BOUNDS = {"mp4": (0.018, 0.25), "webp": (0.015, 0.15), "gif": (0.018, 0.18)}


def _needs(format: str) -> None:
    if format == "mp4":
        pytest.importorskip("av")


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["mp4", "webp", "gif"])
@pytest.mark.parametrize("size", [(48, 64), (33, 47)], ids=["even", "odd"])
def test_round_trip_keeps_frames_size_rate_and_pixels_within_the_measured_bound(
    format: str, size: tuple[int, int], tmp_path: Path
) -> None:
    _needs(format)
    height, width = size
    video = smooth_clip(frames=12, height=height, width=width)
    ctx = context(tmp_path)
    saved = save(ctx, video, format, fps=12.0)
    assert saved["format"] == format
    [path] = saved["paths"]
    assert Path(path).name == f"clip_00000.{format}" and Path(path).parent == ctx.output_dir / "clips"
    loaded = load(ctx, path)
    assert loaded["frame_count"] == 12 and loaded["fps"] == pytest.approx(12.0)
    assert loaded["video"].shape == (1, 12, 3, height, width) and loaded["video"].dtype == torch.float32
    error = (loaded["video"] - video).abs()
    mean_bound, max_bound = BOUNDS[format]
    assert float(error.mean()) <= mean_bound and float(error.max()) <= max_bound, (float(error.mean()), float(error.max()))
    # the bound tells pictures apart: the clip mirrored left to right is well outside it
    mirrored = (loaded["video"] - video.flip(-1)).abs().mean()
    assert float(mirrored) > 3 * mean_bound


@pytest.mark.parametrize("format", ["webp", "gif"])
def test_identical_neighbour_frames_merged_by_the_writer_come_back_as_frames(format: str, tmp_path: Path) -> None:
    video = smooth_clip(frames=10)
    video[:, 3] = video[:, 2]
    video[:, 4] = video[:, 2]  # frames 2, 3, 4 identical: the writer stores one frame shown three times
    ctx = context(tmp_path)
    [path] = save(ctx, video, format)["paths"]
    assert read_header(path).frames == 8
    loaded = load(ctx, path)
    assert loaded["frame_count"] == 10 and loaded["video"].shape[1] == 10
    assert torch.equal(loaded["video"][0, 2], loaded["video"][0, 4])
    assert float((loaded["video"] - video).abs().mean()) <= BOUNDS[format][0]


@pytest.mark.parametrize("format", ["mp4", "webp", "gif"])
def test_each_clip_is_one_file_and_names_count_on_without_overwriting(format: str, tmp_path: Path) -> None:
    _needs(format)
    ctx = context(tmp_path)
    video = smooth_clip(frames=3, height=32, width=48, clips=2)
    first = save(ctx, video, format)["paths"]
    again = save(ctx, video[:1], format)["paths"]
    assert [Path(p).name for p in first + again] == [f"clip_0000{i}.{format}" for i in range(3)]
    second_clip = load(ctx, first[1])["video"]
    assert float((second_clip - video[1:2]).abs().mean()) < float((second_clip - video[:1]).abs().mean()) / 2


def test_start_frame_max_frames_and_stride_select_frames_and_scale_the_rate(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    video = smooth_clip(frames=10)
    [path] = save(ctx, video, "gif", fps=10.0)["paths"]
    full = load(ctx, path)["video"]
    part = load(ctx, path, start_frame=1, max_frames=3, stride=2)
    assert part["frame_count"] == 3 and part["fps"] == pytest.approx(5.0)
    assert torch.equal(part["video"], full[:, [1, 3, 5]])
    with pytest.raises(NodeInputError) as info:
        load(ctx, path, start_frame=10)
    assert info.value.input == "start_frame" and "10 frames" in str(info.value)


def test_a_file_that_is_not_a_video_is_refused_naming_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "notes.mp4").write_text("not a video at all")
    with pytest.raises(NodeInputError) as info:
        load(context(tmp_path), tmp_path / "notes.mp4")
    assert info.value.input == "path" and "expected an MP4, WebP or GIF" in str(info.value)


# --- the header check, before decoding -----------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any decoding fail the test (and record the attempt)."""
    attempts: list[str] = []

    def refuse(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(str(path))
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(codecs, "decode", refuse)
    return attempts


@pytest.mark.parametrize("format", ["mp4", "webp", "gif"])
def test_a_video_over_max_video_pixels_is_refused_from_its_header_before_decoding(
    format: str, tmp_path: Path, no_decoding: list[str]
) -> None:
    _needs(format)
    [path] = save(context(tmp_path), smooth_clip(frames=10, height=16, width=24), format)["paths"]
    limited = context(tmp_path, max_video_pixels=9 * 16 * 24)  # one frame short
    with pytest.raises(VideoTooLargeError, match=r"10 frames of 24×16 = 3,840 pixels.*max_video_pixels"):
        load(limited, path)
    assert no_decoding == []


def test_max_frames_and_stride_count_only_the_frames_that_will_be_decoded(tmp_path: Path) -> None:
    [path] = save(context(tmp_path), smooth_clip(frames=10, height=16, width=24), "gif")["paths"]
    limited = context(tmp_path, max_video_pixels=4 * 16 * 24)
    assert load(limited, path, max_frames=4)["frame_count"] == 4
    with pytest.raises(VideoTooLargeError):
        load(limited, path, max_frames=3, stride=2)  # frames 0, 2, 4: five decoded


def _patch(path: str | Path, marker: bytes, offset: int, value: bytes) -> None:
    data = bytearray(Path(path).read_bytes())
    at = data.index(marker) + offset
    data[at:at + len(value)] = value
    Path(path).write_bytes(bytes(data))


def test_an_mp4_whose_header_claims_a_billion_frames_is_refused_without_decoding(
    tmp_path: Path, no_decoding: list[str]
) -> None:
    pytest.importorskip("av")
    [path] = save(context(tmp_path), smooth_clip(frames=4, height=16, width=16), "mp4")["paths"]
    _patch(path, b"stsz", 4 + 8, struct.pack(">I", 1_000_000_000))  # the sample count
    assert read_header(path).frames == 1_000_000_000
    with pytest.raises(VideoTooLargeError, match="1,000,000,000 frames"):
        load(context(tmp_path), path)
    assert no_decoding == []


def test_a_webp_whose_header_claims_a_huge_canvas_is_refused_without_decoding(
    tmp_path: Path, no_decoding: list[str]
) -> None:
    [path] = save(context(tmp_path), smooth_clip(frames=12, height=16, width=16), "webp")["paths"]
    _patch(path, b"VP8X", 8 + 4, (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little"))
    header = read_header(path)
    assert (header.width, header.height, header.frames) == (16384, 16384, 12)
    with pytest.raises(VideoTooLargeError, match="12 frames of 16384×16384"):
        load(context(tmp_path), path)
    assert no_decoding == []


def test_a_gif_whose_screen_claims_a_huge_size_is_refused_without_decoding(tmp_path: Path, no_decoding: list[str]) -> None:
    [path] = save(context(tmp_path), smooth_clip(frames=2, height=16, width=16), "gif")["paths"]
    _patch(path, b"GIF89a", 6, struct.pack("<HH", 65535, 65535))
    with pytest.raises(VideoTooLargeError, match="65535×65535"):
        load(context(tmp_path), path)
    assert no_decoding == []


def test_an_mp4_decoding_to_larger_frames_than_its_header_declares_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("av")
    [path] = save(context(tmp_path), smooth_clip(frames=4, height=48, width=64), "mp4")["paths"]
    _patch(path, b"stsd", 4 + 8 + 8 + 24, struct.pack(">HH", 16, 16))  # the avc1 sample entry's width and height
    _patch(path, b"tkhd", 4 + 76, struct.pack(">II", 16 << 16, 16 << 16))
    assert (read_header(path).width, read_header(path).height) == (16, 16)
    with pytest.raises(NodeInputError, match="larger than the 16×16 its header declares"):
        load(context(tmp_path), path)


# --- confinement ---------------------------------------------------------------------------------


def test_a_video_outside_the_read_folders_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere")
    [path] = save(context(outside), smooth_clip(frames=2, height=8, width=8), "gif")["paths"]
    here = tmp_path_factory.mktemp("here")
    with pytest.raises(UnsafeOperationError, match="outside the allowed read folders"):
        load(context(here), path)
    text = f"format_version: 1\nnodes:\n  load: {{type: dagfusion.video.LoadVideo, inputs: {{path: {path}}}}}\n"
    with pytest.raises(ValidationError, match="outside the allowed read folders"):
        run_workflow(text, tmp_path=here)


def test_a_link_inside_the_read_folders_to_a_video_outside_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere")
    [path] = save(context(outside), smooth_clip(frames=2, height=8, width=8), "gif")["paths"]
    here = tmp_path_factory.mktemp("here")
    (here / "clip.gif").symlink_to(path)
    with pytest.raises(UnsafeOperationError, match="outside the allowed read folders"):
        load(context(here), here / "clip.gif")


@pytest.mark.parametrize("prefix", ["../escaped", "clips/../../escaped", "/tmp/escaped"])
def test_output_names_cannot_leave_the_output_folder(prefix: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafeOperationError):
        save(context(tmp_path), smooth_clip(frames=2, height=8, width=8), "gif", filename_prefix=prefix)
    assert not list(tmp_path.parent.glob("escaped*")) and not list(Path("/tmp").glob("escaped_0000*"))


# --- the PNG fallback ----------------------------------------------------------------------------


def _warnings(ctx) -> list[str]:  # type: ignore[no-untyped-def]
    return [event.message for event in ctx.handler.of(RunWarning)]


def test_without_pyav_mp4_falls_back_to_png_frames_with_a_warning_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    ctx = context(tmp_path)
    video = smooth_clip(frames=3, height=16, width=24, clips=2)
    with caplog.at_level(logging.WARNING):
        saved = save(ctx, video, "mp4")
    assert saved["format"] == "png"
    names = [Path(p).name for p in saved["paths"]]
    assert names == [f"clip_0000{c}_0000{f}.png" for c in range(2) for f in range(3)]
    assert not list(ctx.output_dir.rglob("*.mp4"))
    first, _second = _warnings(ctx)
    assert "PyAV" in first and "pip install" in first and "clip_00000.mp4" in first and "PNG" in first
    assert "PyAV" in caplog.text
    # every frame kept, with the workflow and where it belongs
    import numpy as np
    from PIL import Image

    frame = torch.from_numpy(np.array(Image.open(saved["paths"][4]))).permute(2, 0, 1) / 255.0
    assert float((frame - video[1, 1]).abs().max()) <= 1 / 255 + 1e-6
    chunks = read_png_text(saved["paths"][4])
    assert chunks["dagfusion.workflow"] == WORKFLOW
    assert '"requested_format": "mp4"' in chunks["dagfusion.manifest"] and '"frame": 1' in chunks["dagfusion.manifest"]
    workflow, problems = read_source(saved["paths"][4])
    assert problems == [] and workflow is not None and list(workflow.nodes) == ["noise"]


def test_without_pyav_loading_an_mp4_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("av")
    [path] = save(context(tmp_path), smooth_clip(frames=2, height=16, width=16), "mp4")["paths"]
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(codecs.FormatUnavailable, match="PyAV.*pip install"):
        load(context(tmp_path), path)


def test_a_missing_h264_encoder_falls_back_to_png_frames_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("av")
    monkeypatch.setattr(codecs, "H264_ENCODER", "no_such_h264_encoder")
    ctx = context(tmp_path)
    saved = save(ctx, smooth_clip(frames=2, height=16, width=16), "mp4")
    assert saved["format"] == "png" and len(saved["paths"]) == 2
    [warning] = _warnings(ctx)
    assert "no H.264 encoder" in warning and "no_such_h264_encoder" in warning


def test_pillow_without_webp_falls_back_to_png_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import features

    real = features.check
    monkeypatch.setattr(features, "check", lambda name: False if name == "webp" else real(name))
    ctx = context(tmp_path)
    saved = save(ctx, smooth_clip(frames=2, height=16, width=16), "webp")
    assert saved["format"] == "png" and [Path(p).suffix for p in saved["paths"]] == [".png", ".png"]
    assert "without WebP" in _warnings(ctx)[0]


def test_a_writer_failing_on_a_clip_keeps_its_frames_as_pngs_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path, frames, **options):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"GIF89a partial")
        raise OSError("disk trouble")

    monkeypatch.setitem(codecs.WRITERS, "gif", broken)
    ctx = context(tmp_path)
    saved = save(ctx, smooth_clip(frames=2, height=8, width=8), "gif")
    assert saved["format"] == "png" and len(saved["paths"]) == 2
    assert not (ctx.output_dir / "clips" / "clip_00000.gif").exists()
    assert "OSError: disk trouble" in _warnings(ctx)[0]


# --- the workflow, embedded and read back --------------------------------------------------------


@pytest.mark.parametrize("format", ["mp4", "webp", "gif"])
def test_the_workflow_is_embedded_and_read_back_by_read_source(format: str, tmp_path: Path) -> None:
    _needs(format)
    [path] = save(context(tmp_path), smooth_clip(frames=3, height=16, width=16), format)["paths"]
    assert not sidecar_path(path).exists()
    found, problems = read_text(path)
    assert problems == [] and found is not None and found.kind == format and found.text == WORKFLOW
    workflow, problems = read_source(Path(path).read_bytes())
    assert problems == [] and workflow is not None and list(workflow.nodes) == ["noise"]
    document = read_video_metadata(path)
    assert document is not None and document["manifest"]["run"] == "test"
    assert document["video"] == {**document["video"], "frames": 3, "fps": 8.0, "width": 16, "height": 16, "format": format}


def test_a_container_that_dropped_the_metadata_gets_a_sidecar_read_back_in_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = codecs.WRITERS["gif"]
    monkeypatch.setitem(codecs.WRITERS, "gif", lambda path, frames, **kw: real(path, frames, **{**kw, "metadata": None}))
    ctx = context(tmp_path)
    video = smooth_clip(frames=5, height=16, width=16)
    video[:, 1] = video[:, 0]  # merged by the writer: only the sidecar's frame count restores it
    [path] = save(ctx, video, "gif")["paths"]
    assert read_header(path).metadata is None and sidecar_path(path).is_file()
    found, problems = read_text(path)
    assert problems == [] and found is not None and found.text == WORKFLOW
    assert load(ctx, path)["frame_count"] == 5


def test_without_embed_workflow_no_workflow_is_stored(tmp_path: Path) -> None:
    [path] = save(context(tmp_path), smooth_clip(frames=2, height=8, width=8), "gif", embed_workflow=False)["paths"]
    document = read_video_metadata(path)
    assert document is not None and "workflow" not in document and "manifest" not in document
    found, problems = read_text(path)
    assert found is None and [p.code for p in problems] == ["no-workflow"]


def test_a_foreign_video_without_metadata_reads_as_no_workflow(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "foreign.gif"
    frames = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    found, problems = read_text(path)
    assert found is None and [p.code for p in problems] == ["no-workflow"] and "foreign.gif.json" in problems[0].message
    loaded = load(context(tmp_path), path)
    assert loaded["frame_count"] == 3 and loaded["fps"] == pytest.approx(10.0)


def test_a_saved_video_reruns_its_workflow(tmp_path: Path) -> None:
    """LoadVideo → ExtractFrames → FramesToVideo → SaveVideo in a run; the saved file runs again."""
    source = tmp_path / "source.gif"
    codecs.write_gif(source, codecs.to_uint8(smooth_clip(frames=4, height=16, width=16)[0], keep_alpha=False),
                     fps=8.0, loop=0, metadata=None)
    text = f"""format_version: 1
nodes:
  load: {{type: dagfusion.video.LoadVideo, inputs: {{path: {source}}}}}
  pick: {{type: dagfusion.video.ExtractFrames, inputs: {{video: {{from: load.video}}, frames: "::2"}}}}
  clip: {{type: dagfusion.video.FramesToVideo, inputs: {{images: {{from: pick.images}}}}}}
  save: {{type: dagfusion.video.SaveVideo, inputs: {{video: {{from: clip.video}}, format: webp, filename_prefix: again}}}}
"""
    result = run_workflow(text, tmp_path=tmp_path)
    [saved] = result.output("save.paths")
    workflow, problems = read_source(saved)
    assert problems == [] and workflow is not None
    assert list(workflow.nodes) == ["load", "pick", "clip", "save"]
    assert read_header(saved).frames == 2
    rerun = run_workflow(saved, tmp_path=tmp_path, out=tmp_path / "outputs" / "rerun")
    [again] = rerun.output("save.paths")
    assert read_header(again).frames == 2 and Path(again).parent.name == "rerun"
