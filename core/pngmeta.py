"""Workflows embedded in PNG files: text chunks ``dagfusion.workflow`` (YAML) and
``dagfusion.manifest`` (JSON), so a picture can be inspected and re-run.

Writing goes through Pillow (:func:`png_info`). Reading (:func:`read_png_text`, :func:`png_size`)
parses the PNG chunk structure here and never decodes pixels, so a file declaring an enormous
image, or a text chunk that inflates without end, costs a bounded amount of time and memory:
only the two dagfusion keys are kept, compressed text is inflated at most to
:data:`MAX_CHUNK_CHARS` bytes, a file is read for at most :data:`MAX_READ_BYTES` bytes and
:data:`MAX_CHUNKS` chunks, and anything malformed is skipped rather than raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from typing import IO, Any

WORKFLOW_KEY = "dagfusion.workflow"
MANIFEST_KEY = "dagfusion.manifest"
#: Longest text kept per key, in characters; its encoded (inflated) bytes are held to the same number.
MAX_CHUNK_CHARS = 16 * 1024 * 1024
#: Most bytes :func:`read_png_text` reads from one file (chunk headers and the text chunks it keeps).
MAX_READ_BYTES = 4 * MAX_CHUNK_CHARS
#: Most chunks :func:`read_png_text` looks at before giving up on finding the rest.
MAX_CHUNKS = 100_000

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_KEYS = (WORKFLOW_KEY, MANIFEST_KEY)
_TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")
_KEYWORD_BYTES = 80  # a keyword is 1-79 Latin-1 bytes and a NUL
_MAX_CHUNK_LENGTH = 2**31 - 1  # the PNG specification's bound on a chunk's data length
_SKIP_BLOCK = 64 * 1024
_INFLATE_STEP = 256 * 1024

Source = str | os.PathLike[str] | IO[bytes]


class _Malformed(Exception):
    """The PNG data ends early, breaks the chunk structure or exceeds a reading bound."""


def png_info(workflow_yaml: str, manifest: dict[str, Any] | None = None) -> Any:
    """A ``PIL.PngImagePlugin.PngInfo`` holding the workflow and manifest as compressed text."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(WORKFLOW_KEY, workflow_yaml, zip=True)
    if manifest is not None:
        info.add_itxt(MANIFEST_KEY, json.dumps(manifest, default=str), zip=True)
    return info


def read_png_text(source: Source) -> dict[str, str]:
    """The dagfusion text chunks of a PNG file or binary stream, without decoding any pixel.

    Returns ``{key: text}`` for the keys ``dagfusion.workflow`` and ``dagfusion.manifest`` found
    in ``tEXt``, ``zTXt`` or ``iTXt`` chunks with a correct CRC (the first of each key wins),
    each at most :data:`MAX_CHUNK_CHARS` long. A stream is read from its current position and
    left open. Never raises for the file's content: an unreadable or non-PNG file gives ``{}``,
    a malformed one the keys found before the damage.
    """
    found: dict[str, str] = {}
    try:
        with _binary(source) as fh:
            for key, text in _dagfusion_texts(_Reader(fh, MAX_READ_BYTES)):
                found.setdefault(key, text)
                if len(found) == len(_KEYS):
                    break
    except (OSError, ValueError, _Malformed):
        pass
    return found


def png_size(source: Source) -> tuple[int, int]:
    """``(width, height)`` from a PNG's ``IHDR`` chunk (reads 33 bytes, decodes nothing).

    :raises ValueError: the data is not a PNG starting with a well-formed ``IHDR`` chunk.
    :raises OSError: the file cannot be read.
    """
    name = source if isinstance(source, (str, os.PathLike)) else "the stream"
    with _binary(source) as fh:
        reader = _Reader(fh, 64)
        try:
            if reader.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise ValueError(f"{str(name)!r} is not a PNG file")
            length, kind = _chunk_header(reader)
            if kind != b"IHDR" or length != 13:
                raise ValueError(f"{str(name)!r} does not start with a PNG IHDR chunk")
            data, crc = reader.read(13), reader.read(4)
        except _Malformed as exc:
            raise ValueError(f"{str(name)!r} is a truncated PNG file: {exc}") from None
    width, height = struct.unpack(">II", data[:8])
    if not _crc_ok(kind, data, crc) or not (0 < width <= _MAX_CHUNK_LENGTH and 0 < height <= _MAX_CHUNK_LENGTH):
        raise ValueError(f"{str(name)!r} has a damaged PNG IHDR chunk")
    return width, height


def is_png(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` starts with the PNG signature (``False`` if unreadable or not
    a regular file)."""
    try:
        with _open_regular(path) as fh:
            return fh.read(8) == PNG_SIGNATURE
    except OSError:
        return False


# --- reading chunks -------------------------------------------------------------------------------


@contextlib.contextmanager
def _binary(source: Source) -> Iterator[IO[bytes]]:
    """``source`` as a binary stream: a stream as is (left open), a path opened (and closed)."""
    if hasattr(source, "read"):
        yield source  # type: ignore[misc]
        return
    with _open_regular(source) as fh:  # type: ignore[arg-type]
        yield fh


def _open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """``path`` opened for reading bytes, refusing (``OSError``) anything but a regular file.

    Opened without blocking and checked on the open descriptor, so a FIFO or device in its
    place can neither hang the reader nor be swapped in after the check.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.fspath(path)!r} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _Reader:
    """Reads and skips bytes of a stream, raising :class:`_Malformed` on a short read or once
    more than ``budget`` bytes were read."""

    def __init__(self, fh: IO[bytes], budget: int) -> None:
        self._fh = fh
        self._left = budget
        self._seekable = bool(getattr(fh, "seekable", lambda: False)())

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes."""
        if size > self._left:
            raise _Malformed("more bytes to read than the reading bound allows")
        data = self._fh.read(size)
        self._left -= len(data)
        if len(data) != size:
            raise _Malformed("the data ends early")
        return data

    def skip(self, size: int) -> None:
        """Move ``size`` bytes on without keeping them (a seek where the stream allows it)."""
        if self._seekable:
            self._fh.seek(size, os.SEEK_CUR)
            return
        while size > 0:
            step = min(size, _SKIP_BLOCK)
            self.read(step)
            size -= step


def _chunk_header(reader: _Reader) -> tuple[int, bytes]:
    """``(data length, chunk type)`` of the next chunk; :class:`_Malformed` if it is not one."""
    length, kind = struct.unpack(">I4s", reader.read(8))
    if length > _MAX_CHUNK_LENGTH or not kind.isalpha():
        raise _Malformed(f"a damaged chunk header (type {kind!r}, length {length})")
    return length, kind


def _dagfusion_texts(reader: _Reader) -> Iterator[tuple[str, str]]:
    """``(key, text)`` of each well-formed dagfusion text chunk, in file order, up to ``IEND``.

    Other chunks are skipped unread; a text chunk is read only when its keyword is a dagfusion
    key and it is small enough to hold at most :data:`MAX_CHUNK_CHARS` of text.
    """
    if reader.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
        return
    for _ in range(MAX_CHUNKS):
        length, kind = _chunk_header(reader)
        if kind == b"IEND":
            return
        if kind not in _TEXT_TYPES or length > MAX_CHUNK_CHARS + _KEYWORD_BYTES + 3:
            reader.skip(length + 4)
            continue
        head = reader.read(min(length, _KEYWORD_BYTES))
        if _keyword(head) not in _KEYS:
            reader.skip(length - len(head) + 4)
            continue
        data = head + reader.read(length - len(head))
        if not _crc_ok(kind, data, reader.read(4)):
            continue
        parsed = _parse_text(kind, data)
        if parsed is not None:
            yield parsed


def _crc_ok(kind: bytes, data: bytes, crc: bytes) -> bool:
    return zlib.crc32(data, zlib.crc32(kind)) == int.from_bytes(crc, "big")


def _keyword(data: bytes) -> str | None:
    """The keyword a text chunk's data starts with, or ``None`` if there is none."""
    end = data.find(b"\0", 0, _KEYWORD_BYTES)
    return data[:end].decode("latin-1") if end > 0 else None


def _parse_text(kind: bytes, data: bytes) -> tuple[str, str] | None:
    """``(keyword, text)`` of a ``tEXt``/``zTXt``/``iTXt`` chunk's data; ``None`` if malformed or too long."""
    keyword, _, body = data.partition(b"\0")
    if kind == b"tEXt":
        raw: bytes | None = body
        encoding = "latin-1"
    elif kind == b"zTXt":
        raw = _inflate(body[1:]) if body[:1] == b"\0" else None
        encoding = "latin-1"
    else:
        raw = _itxt_text(body)
        encoding = "utf-8"
    if raw is None or len(raw) > MAX_CHUNK_CHARS:
        return None
    try:
        return keyword.decode("latin-1"), raw.decode(encoding)
    except UnicodeDecodeError:
        return None


def _itxt_text(body: bytes) -> bytes | None:
    """The (inflated) text bytes of an ``iTXt`` chunk after its keyword, or ``None`` if malformed."""
    if len(body) < 2 or body[0] not in (0, 1) or body[1] != 0:
        return None
    _language, sep1, rest = body[2:].partition(b"\0")
    _translated, sep2, text = rest.partition(b"\0")
    if not (sep1 and sep2):
        return None
    return _inflate(text) if body[0] == 1 else text


def _inflate(data: bytes) -> bytes | None:
    """``data`` inflated (zlib) if it is a complete stream of at most :data:`MAX_CHUNK_CHARS`
    bytes; ``None`` otherwise. Inflates step by step, stopping as soon as the bound is passed."""
    inflater = zlib.decompressobj()
    pieces: list[bytes] = []
    total = 0
    try:
        while not inflater.eof:
            piece = inflater.decompress(data, _INFLATE_STEP)
            total += len(piece)
            if total > MAX_CHUNK_CHARS:
                return None
            pieces.append(piece)
            data = inflater.unconsumed_tail
            if not data and len(piece) < _INFLATE_STEP:
                break  # all input used and nothing pending: the stream ends early unless it is complete
    except zlib.error:
        return None
    return b"".join(pieces) if inflater.eof else None
