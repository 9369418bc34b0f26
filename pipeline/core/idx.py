"""Read and write the IDX files that Fashion-MNIST (like MNIST) is distributed in.

The reader is strict on purpose: a download that was cut short or a file mixed up with another
one must fail here, with the file's name and what was wrong, rather than as a reshape error or a
silently shorter data set further down the pipeline.

Format: a big-endian header (two zero bytes, a type code — 0x08 for unsigned bytes — and the
number of dimensions, then one uint32 per dimension) followed by the values in C order. Files
are usually gzipped; gzip is recognised by its magic bytes (or a `.gz` name) and undone here.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import (
    MAX_ARRAY_FILE_BYTES,
    FileRefusedError,
    atomic_write_bytes,
    read_bounded,
)

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]  # one image, flattened as the models see it
GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08

Kind = Literal["images", "labels"]
_KIND_OF_MAGIC: dict[int, Kind] = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
_MAGIC_OF_KIND = {kind: magic for magic, kind in _KIND_OF_MAGIC.items()}


class IdxFormatError(PipelineError, ValueError):
    """A file that is not a valid Fashion-MNIST IDX file; the message names the file."""


def _fail(path: Path, problem: str) -> IdxFormatError:
    return IdxFormatError(f"{path}: {problem}")


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """The file's IDX bytes, and whether they had to be decompressed."""
    try:
        raw = read_bounded(path, MAX_ARRAY_FILE_BYTES)
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    except FileRefusedError as exc:
        raise IdxFormatError(str(exc)) from None
    if raw[:2] != GZIP_MAGIC:
        # An uncompressed IDX file (starting 00 00) that merely carries a .gz name is readable.
        if path.suffix.lower() == ".gz" and raw[:2] != b"\x00\x00":
            raise _fail(
                path, f"not a gzip file: starts with {raw[:2].hex()!r}, expected '1f8b'"
            )
        return raw, False
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:  # bounded: no gzip bomb
            data = stream.read(MAX_ARRAY_FILE_BYTES + 1)
        if len(data) > MAX_ARRAY_FILE_BYTES:
            raise _fail(path, f"decompresses to more than {MAX_ARRAY_FILE_BYTES} bytes")
        return data, True
    except EOFError:
        raise _fail(
            path, f"truncated gzip stream: the compressed file ends early ({len(raw)} bytes)"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise _fail(path, f"corrupt gzip stream: {exc}") from None


def _describe_magic(magic: int) -> str:
    return f"{magic} (0x{magic:08x})"


def read_idx(path: str | Path, kind: Kind | None = None) -> np.ndarray:
    """Read a Fashion-MNIST IDX file, gzipped or not, and check every byte of its layout.

    Returns a writable uint8 array: (n, 28, 28) for images (magic 2051), (n,) for labels
    (magic 2049). `kind` ("images" or "labels") additionally requires that type, so swapped
    file names are caught. Raises `IdxFormatError` naming the file and the expected and actual
    values when the magic number, the dimensions or the file length are wrong.
    """
    path = Path(path)
    data, compressed = _read_bytes(path)
    if len(data) < 4:
        raise _fail(path, f"too short for an IDX header: {len(data)} bytes, expected at least 4")
    (magic,) = struct.unpack(">I", data[:4])
    if magic not in _KIND_OF_MAGIC:
        raise _fail(
            path,
            f"bad magic number {_describe_magic(magic)}: expected {IMAGES_MAGIC} (0x00000803, "
            f"uint8 images) or {LABELS_MAGIC} (0x00000801, uint8 labels)",
        )
    found = _KIND_OF_MAGIC[magic]
    if kind is not None and found != kind:
        raise _fail(
            path,
            f"holds {found} (magic {_describe_magic(magic)}), expected {kind} "
            f"(magic {_describe_magic(_MAGIC_OF_KIND[kind])})",
        )
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise _fail(
            path,
            f"truncated header: {len(data)} bytes, expected {header_size} for {ndim} dimensions",
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if found == "images" and shape[1:] != IMAGE_SHAPE:
        raise _fail(
            path,
            f"images of {shape[1]}x{shape[2]} pixels, expected "
            f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}",
        )
    expected = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes after the data"
        detail = "x".join(map(str, shape))
        raise _fail(
            path,
            f"{what}: header declares {shape[0]} {found} ({detail}), which takes {expected} bytes"
            f" with the header, but the {'decompressed ' if compressed else ''}file has"
            f" {len(data)} bytes",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def idx_bytes(array: np.ndarray) -> bytes:
    """The uncompressed IDX encoding of a uint8 array of any number of dimensions (1 to 255)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX arrays must be uint8 here, got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX arrays have 1 to 255 dimensions, got {array.ndim}")
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, _UBYTE, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Atomically write `array` as IDX, gzipped when `path` ends in `.gz`.

    The gzip header gets mtime 0 and no file name, so the same array always gives the same
    bytes (and MD5), which tests and synthetic mirrors rely on.
    """
    path = Path(path)
    data = idx_bytes(array)
    if path.suffix.lower() == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)
