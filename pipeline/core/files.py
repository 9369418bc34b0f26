"""Atomic file writes, MD5 checksums and byte-reproducible `.npz` archives.

Every output of the pipeline is written through `atomic_write`, so a crash, a full disk or a
Ctrl-C leaves either the previous file or the new one, never half of one: DVC and the next
stage can then trust whatever file they find.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

CHUNK_SIZE = 1 << 20

# Zip entries carry a timestamp; a fixed one (the earliest a zip file can hold) keeps the
# archives byte-identical from run to run.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5sum(path: str | Path, chunk_size: int = CHUNK_SIZE) -> str:
    """Hex MD5 of a file, read in chunks so that large archives need little memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def temp_path_for(path: str | Path) -> Path:
    """A fresh hidden name next to `path`: same directory, so `os.replace` is a rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def is_temp_file_of(candidate: Path, name: str) -> bool:
    """True for the temporary files that `atomic_write` makes for a file called `name`."""
    return candidate.name.startswith(f".{name}.") and candidate.name.endswith(".tmp")


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only when the block finishes without error.

    Missing parent directories are created.
    On any exception (including KeyboardInterrupt) the temporary file is removed and `path`
    keeps its previous content, or stays absent.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_path_for(path)
        try:
            # 0o666 minus the umask: the same permissions as a file made with open().
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _write_npz_to(f: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # Unix, whatever the platform that writes it
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an uncompressed `.npz` archive that `np.load` reads, with fixed metadata.

    `np.savez` stamps every entry with the current time, so two runs on the same data differ;
    here the entries get `ZIP_DATE_TIME`, fixed permissions and their names in the given order.
    """
    buffer = io.BytesIO()
    _write_npz_to(buffer, arrays)
    return buffer.getvalue()


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write a byte-reproducible `.npz` archive, the same bytes as `npz_bytes`."""
    with atomic_write(path) as f:
        _write_npz_to(f, arrays)
