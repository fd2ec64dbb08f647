"""Image decoders check the declared size against max_image_pixels before decoding anything."""

from __future__ import annotations

import struct
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFile

from dagfusion import Engine, UnsafeOperationError
from dagfusion.imagelimits import ImageTooLargeError, check_image_pixels, open_image
from dagfusion.settings import DEFAULT_MAX_IMAGE_PIXELS
from dagfusion.workflow import load_workflow

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gray_bitmap_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG of ``width`` × ``height``: tiny on disk, huge once decoded."""
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` × ``height`` RGB but whose data is a few bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if any pixel is decoded."""

    def refuse(self: Any) -> None:
        raise AssertionError(f"decoding {self.size} was attempted")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def load_image(engine: Engine, path: Path, out: Path) -> Any:
    wf = load_workflow(
        textwrap.dedent(
            f"""\
            format_version: 1
            nodes:
              load: {{type: dagfusion.image.LoadImage, inputs: {{path: "{path}"}}}}
            """
        ),
        text=True,
    )
    return engine.run(wf, out=out)


def test_a_small_file_declaring_13000_squared_is_refused_before_decoding(engine, tmp_path, no_decoding) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(gray_bitmap_png(13_000, 13_000))
    assert path.stat().st_size < 64 * 1024
    result = load_image(engine, path, tmp_path / "run")
    error = result.errors["load"].original
    assert isinstance(error, ImageTooLargeError) and isinstance(error, UnsafeOperationError)
    message = str(error)
    assert str(path) in message and "13000×13000" in message and "169,000,000" in message
    assert f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in message and "max_image_pixels" in message
    assert "DAGFUSION_MAX_IMAGE_PIXELS" in message


def test_a_header_beyond_pillows_own_bomb_limit_gets_the_same_refusal(engine, tmp_path, no_decoding) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(declared_png(50_000, 50_000))
    error = load_image(engine, path, tmp_path / "run").errors["load"].original
    assert isinstance(error, ImageTooLargeError) and "50000×50000" in str(error)


def test_the_limit_comes_from_the_settings(registry, settings, tmp_path) -> None:
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "sixty-four.png")
    Image.new("RGB", (9, 7)).save(tmp_path / "sixty-three.png")
    engine = Engine(registry, settings.with_overrides(max_image_pixels=63))
    refused = load_image(engine, tmp_path / "sixty-four.png", tmp_path / "a").errors["load"].original
    assert isinstance(refused, ImageTooLargeError) and "limit of 63 pixels" in str(refused)
    result = load_image(engine, tmp_path / "sixty-three.png", tmp_path / "b")
    assert result.ok, result.errors
    assert tuple(result.output("load.image").shape) == (1, 3, 7, 9)


def test_images_within_the_limit_load_as_before(engine, tmp_path) -> None:
    Image.new("RGBA", (6, 4), (0, 0, 255, 0)).save(tmp_path / "ok.png")
    result = load_image(engine, tmp_path / "ok.png", tmp_path / "run")
    assert result.ok, result.errors
    assert float(result.output("load.mask").min()) == 1.0
    (tmp_path / "not-an-image.png").write_bytes(b"hello")
    error = load_image(engine, tmp_path / "not-an-image.png", tmp_path / "bad").errors["load"].original
    assert isinstance(error, ValueError) and "Pillow can read" in str(error)


def test_open_image_restores_pillows_limit_and_reads_only_the_header(tmp_path, no_decoding) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(declared_png(20_000, 20_000))  # beyond 2 × Pillow's default limit
    before = Image.MAX_IMAGE_PIXELS
    with open_image(path, 10**9) as picture:
        assert picture.size == (20_000, 20_000)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(ImageTooLargeError):
        open_image(path, 10**8)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(Exception, match="cannot identify"):
        open_image(path, 10**9, formats=("JPEG",))
    assert Image.MAX_IMAGE_PIXELS == before


def test_check_image_pixels_counts_width_times_height() -> None:
    check_image_pixels("a", 8, 8, 64)
    with pytest.raises(ImageTooLargeError, match="a is 8×9 = 72 pixels, more than the limit of 64"):
        check_image_pixels("a", 8, 9, 64)
