"""Reading dagfusion text chunks from PNG files without decoding pixels, on good and hostile files."""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from dagfusion import pngmeta
from dagfusion.pngmeta import MANIFEST_KEY, WORKFLOW_KEY, is_png, png_info, png_size, read_png_text

SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORKFLOW = "format_version: 1\nnodes: {}\n"


def chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk: length, type, data and CRC (the correct one unless ``crc`` is given)."""
    value = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", value)


def ihdr(width: int, height: int) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def text(key: str, value: str) -> bytes:
    return chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))


def ztxt(key: str, compressed: bytes) -> bytes:
    return chunk(b"zTXt", key.encode("latin-1") + b"\0\0" + compressed)


def itxt(key: str, payload: bytes, compressed: bool) -> bytes:
    flag = b"\1" if compressed else b"\0"
    return chunk(b"iTXt", key.encode("latin-1") + b"\0" + flag + b"\0" + b"en\0" + b"\0" + payload)


def png(*chunks: bytes, width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG declaring ``width`` × ``height`` with a tiny (undecodable) IDAT and ``chunks`` before it."""
    return SIGNATURE + ihdr(width, height) + b"".join(chunks) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def zeros_bomb(size: int) -> bytes:
    """A zlib stream that inflates to ``size`` zero bytes, built without holding them."""
    packer = zlib.compressobj(9)
    block = b"\0" * (1024 * 1024)
    parts = [packer.compress(block) for _ in range(size // len(block))]
    return b"".join(parts) + packer.flush()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if Pillow is asked to open or decode anything."""
    from PIL import Image, ImageFile

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow must not be used to read text chunks")

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- good files ------------------------------------------------------------------------------------


def test_an_image_bomb_gives_its_text_quickly_without_decoding(tmp_path: Path, no_decoding: None) -> None:
    manifest = '{"seeds": {"sample.seed": 7}, "prompt": "ein Fuchs \u2014 \u72d0"}'
    path = tmp_path / "bomb.png"
    path.write_bytes(png(text(WORKFLOW_KEY, WORKFLOW), itxt(MANIFEST_KEY, zlib.compress(manifest.encode()), True)))
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    chunks = read_png_text(path)
    assert time.perf_counter() - start < 0.5
    assert chunks == {WORKFLOW_KEY: WORKFLOW, MANIFEST_KEY: manifest}
    assert png_size(path) == (50_000, 50_000)


def test_every_text_chunk_kind_is_read_and_only_dagfusion_keys_are_kept(tmp_path: Path) -> None:
    data = png(
        text("parameters", "other software's text"),
        ztxt(WORKFLOW_KEY, zlib.compress(WORKFLOW.encode())),
        itxt(MANIFEST_KEY, b'{"a": "\xc3\xa9"}', False),
        text(WORKFLOW_KEY, "a later duplicate"),
    )
    assert read_png_text(io.BytesIO(data)) == {WORKFLOW_KEY: WORKFLOW, MANIFEST_KEY: '{"a": "\u00e9"}'}


def test_text_after_the_image_data_is_found(tmp_path: Path) -> None:
    data = png()[:-12] + text(WORKFLOW_KEY, WORKFLOW) + chunk(b"IEND", b"")
    assert read_png_text(io.BytesIO(data)) == {WORKFLOW_KEY: WORKFLOW}


def test_a_stream_is_read_from_its_position_and_left_open() -> None:
    stream = io.BytesIO(b"xx" + png(text(WORKFLOW_KEY, WORKFLOW)))
    stream.seek(2)
    assert read_png_text(stream) == {WORKFLOW_KEY: WORKFLOW}
    assert not stream.closed


def test_a_picture_saved_by_save_image_round_trips(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from dagfusion import Settings
    from dagfusion.context import CancelToken, RunContext
    from dagfusion.nodes.diffusion.images import save_image

    workflow = "format_version: 1\nnodes:\n  a: {type: x.Y, inputs: {prompt: \"ein Fuchs \u2014 \u72d0\"}}\n"
    ctx = RunContext(
        node_id="save", run_id="r", settings=Settings(output_dir=tmp_path), output_dir=tmp_path,
        cancel_token=CancelToken(), provenance={"workflow": workflow, "manifest": {"seeds": {"s": 1}}},
    )
    paths = save_image.fn(ctx, torch.rand(1, 3, 8, 8), "pic", True)
    chunks = read_png_text(paths[0])
    assert chunks[WORKFLOW_KEY] == workflow
    import json

    manifest = json.loads(chunks[MANIFEST_KEY])
    assert manifest["seeds"] == {"s": 1} and manifest["image"]["width"] == 8
    assert png_size(paths[0]) == (8, 8) and is_png(paths[0])


def test_png_info_round_trips_through_pillow(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "p.png"
    Image.new("RGB", (3, 2)).save(path, pnginfo=png_info(WORKFLOW, {"k": "\u00fc"}))
    assert read_png_text(path) == {WORKFLOW_KEY: WORKFLOW, MANIFEST_KEY: '{"k": "\\u00fc"}'}
    assert png_size(path) == (3, 2)


# --- hostile and broken files ----------------------------------------------------------------------


def test_every_truncation_gives_a_subset_and_never_raises() -> None:
    data = png(text(WORKFLOW_KEY, WORKFLOW), ztxt(MANIFEST_KEY, zlib.compress(b"{}")))
    full = {WORKFLOW_KEY: WORKFLOW, MANIFEST_KEY: "{}"}
    assert read_png_text(io.BytesIO(data)) == full
    for end in range(len(data)):
        found = read_png_text(io.BytesIO(data[:end]))
        assert found.items() <= full.items()


def test_a_bad_crc_drops_only_that_chunk() -> None:
    data = png(chunk(b"tEXt", WORKFLOW_KEY.encode() + b"\0forged", crc=0), text(MANIFEST_KEY, "{}"))
    assert read_png_text(io.BytesIO(data)) == {MANIFEST_KEY: "{}"}


@pytest.mark.parametrize("kind", ["zTXt", "iTXt"])
def test_a_zip_bomb_in_compressed_text_is_dropped_with_bounded_memory(kind: str) -> None:
    bomb = zeros_bomb(2 * pngmeta.MAX_CHUNK_CHARS)
    assert len(bomb) < pngmeta.MAX_CHUNK_CHARS // 100
    body = ztxt(WORKFLOW_KEY, bomb) if kind == "zTXt" else itxt(WORKFLOW_KEY, bomb, True)
    data = png(body, text(MANIFEST_KEY, "{}"))
    tracemalloc.start()
    try:
        found = read_png_text(io.BytesIO(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == {MANIFEST_KEY: "{}"}
    assert peak < len(data) + pngmeta.MAX_CHUNK_CHARS + 2 * 1024 * 1024  # the bound and one inflate step


def test_text_longer_than_the_limit_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pngmeta, "MAX_CHUNK_CHARS", 10)
    data = png(text(WORKFLOW_KEY, "x" * 11), itxt(MANIFEST_KEY, zlib.compress(b"y" * 11), True), text("k", "z"))
    assert read_png_text(io.BytesIO(data)) == {}
    assert read_png_text(io.BytesIO(png(text(WORKFLOW_KEY, "x" * 10)))) == {WORKFLOW_KEY: "x" * 10}


@pytest.mark.parametrize(
    "body",
    [
        chunk(b"iTXt", WORKFLOW_KEY.encode() + b"\0\0\0en\0\0\xff\xfe"),  # not UTF-8
        chunk(b"iTXt", WORKFLOW_KEY.encode() + b"\0\1\0en\0\0not zlib"),  # not a zlib stream
        chunk(b"iTXt", WORKFLOW_KEY.encode() + b"\0\1\0en"),  # fields missing
        chunk(b"zTXt", WORKFLOW_KEY.encode() + b"\0\7" + zlib.compress(b"x")),  # unknown method
        chunk(b"zTXt", WORKFLOW_KEY.encode() + b"\0\0" + zlib.compress(b"abc" * 100)[:-6]),  # truncated stream
        chunk(b"tEXt", b"no keyword end" * 10),
    ],
)
def test_malformed_text_chunks_are_skipped(body: bytes) -> None:
    assert read_png_text(io.BytesIO(png(body, text(MANIFEST_KEY, "{}")))) == {MANIFEST_KEY: "{}"}


def test_broken_chunk_structure_keeps_what_came_before() -> None:
    head = SIGNATURE + ihdr(1, 1) + text(WORKFLOW_KEY, WORKFLOW)
    huge = struct.pack(">I", 2**31) + b"tEXt"  # beyond the specification's bound
    assert read_png_text(io.BytesIO(head + huge + text(MANIFEST_KEY, "{}"))) == {WORKFLOW_KEY: WORKFLOW}
    declared = struct.pack(">I", 2**31 - 1) + b"zTXt" + WORKFLOW_KEY.encode() + b"\0\0"  # far past the end
    assert read_png_text(io.BytesIO(head + declared)) == {WORKFLOW_KEY: WORKFLOW}
    not_a_type = struct.pack(">I", 0) + b"\0\0\0\0" + b"\0" * 4
    assert read_png_text(io.BytesIO(head + not_a_type + text(MANIFEST_KEY, "{}"))) == {WORKFLOW_KEY: WORKFLOW}


def test_the_chunk_and_byte_bounds_end_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png(*[chunk(b"abCD", b"") for _ in range(20)], text(WORKFLOW_KEY, WORKFLOW))
    assert read_png_text(io.BytesIO(data)) == {WORKFLOW_KEY: WORKFLOW}
    monkeypatch.setattr(pngmeta, "MAX_CHUNKS", 10)
    assert read_png_text(io.BytesIO(data)) == {}
    monkeypatch.setattr(pngmeta, "MAX_CHUNKS", 100)
    monkeypatch.setattr(pngmeta, "MAX_READ_BYTES", 100)
    assert read_png_text(io.BytesIO(data)) == {}


def test_a_stream_that_cannot_seek_is_skipped_by_reading() -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            chunk_ = self._data.read(len(buffer))
            buffer[: len(chunk_)] = chunk_
            return len(chunk_)

    data = png(text("other", "x" * 1000), text(WORKFLOW_KEY, WORKFLOW))
    assert read_png_text(io.BufferedReader(Pipe(data))) == {WORKFLOW_KEY: WORKFLOW}


def test_files_that_are_not_pngs_give_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"GIF89a not a png")
    assert read_png_text(tmp_path / "a.png") == {}
    assert read_png_text(tmp_path / "missing.png") == {}
    assert read_png_text(tmp_path) == {}
    assert not is_png(tmp_path / "a.png") and not is_png(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "picture.png"
    os.mkfifo(fifo)
    assert read_png_text(fifo) == {} and not is_png(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        png_size(fifo)


def test_png_size_refuses_what_is_not_a_well_formed_header(tmp_path: Path) -> None:
    good = SIGNATURE + ihdr(3, 2)
    assert png_size(io.BytesIO(good)) == (3, 2)
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(io.BytesIO(b"GIF89a" + good))
    with pytest.raises(ValueError, match="truncated"):
        png_size(io.BytesIO(good[:20]))
    with pytest.raises(ValueError, match="damaged"):
        png_size(io.BytesIO(good[:-1] + bytes([good[-1] ^ 1])))
    with pytest.raises(ValueError, match="damaged"):
        png_size(io.BytesIO(SIGNATURE + ihdr(0, 2)))
    with pytest.raises(ValueError, match="IHDR"):
        png_size(io.BytesIO(SIGNATURE + text(WORKFLOW_KEY, WORKFLOW)))
    with pytest.raises(OSError):
        png_size(tmp_path / "missing.png")


@pytest.mark.parametrize("length", [0, 1, 97, 98, 99, 100, 101, 3 * 7 * 5])
def test_inflating_in_steps_keeps_exactly_the_texts_within_the_limit(monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    monkeypatch.setattr(pngmeta, "MAX_CHUNK_CHARS", 100)
    monkeypatch.setattr(pngmeta, "_INFLATE_STEP", 7)
    value = "".join(chr(ord("a") + i % 26) for i in range(length))
    data = png(itxt(WORKFLOW_KEY, zlib.compress(value.encode()), True), ztxt(MANIFEST_KEY, zlib.compress(value.encode())))
    expected = {WORKFLOW_KEY: value, MANIFEST_KEY: value} if length <= 100 else {}
    assert read_png_text(io.BytesIO(data)) == expected


def test_a_large_workflow_round_trips() -> None:
    value = "".join(f"# line {i}\n" for i in range(300_000))  # several MB, many inflate steps
    assert read_png_text(io.BytesIO(png(itxt(WORKFLOW_KEY, zlib.compress(value.encode()), True)))) == {WORKFLOW_KEY: value}
