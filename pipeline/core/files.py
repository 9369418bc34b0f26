"""Atomic file writes, bounded reads, MD5 checksums and byte-reproducible `.npz` archives.

Every output of the pipeline is written through `atomic_write`, so a crash, a full disk or a
Ctrl-C leaves either the previous file or the new one, never half of one: DVC and the next
stage can then trust whatever file they find. A write that fails names the file it was for.

Every input a user hands over (images to predict or add) is read through `open_regular`: only
a regular file, up to a size limit, so a FIFO, a device (a symlink to /dev/zero) or a huge file
is refused at once with its name instead of hanging or filling the memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import stat
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.core.errors import PipelineError

CHUNK_SIZE = 1 << 20

# Per file: one 28x28 PNG is under 1 KB; the whole official training set is a 47 MB IDX file.
MAX_IMAGE_FILE_BYTES = 1 << 20
MAX_ARRAY_FILE_BYTES = 512 << 20


class FileRefusedError(PipelineError, ValueError):
    """An input that is not a regular file of a sensible size; the message names it."""


def _kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: str | Path, limit: int) -> Iterator[BinaryIO]:
    """Open `path` for reading if it is a regular file of at most `limit` bytes.

    Opened without blocking (a FIFO with no writer would otherwise hang here), then checked on
    the open descriptor, so a symlink is judged by what it points to and cannot be swapped
    between the check and the read. FileRefusedError names the file and why.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefusedError(f"{path}: {_kind_of(info.st_mode)}; only regular files "
                                   "are read")
        if info.st_size > limit:
            raise FileRefusedError(f"{path}: {info.st_size} bytes, more than the {limit} "
                                   "bytes allowed for one file")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_bounded(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (see `open_regular`)."""
    with open_regular(path, limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew after the check
        raise FileRefusedError(f"{path}: more than the {limit} bytes allowed for one file")
    return data

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
def atomic_write(path: str | Path, mode: int = 0o666) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only when the block finishes without error.

    Missing parent directories are created; `mode` (minus the umask) is set from the start,
    so a private file (0o600) is never readable by others, not even while it is written.
    On any exception (including KeyboardInterrupt) the temporary file is removed and `path`
    keeps its previous content, or stays absent.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_path_for(path)
        try:
            # 0o666 minus the umask by default: the same permissions as open() gives.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if exc.filename is not None:
            raise
        # A full disk reports only "[Errno 28] No space left on device": say which file.
        hint = "; free some space and run again" if exc.errno in (errno.ENOSPC,
                                                                  errno.EDQUOT) else ""
        raise type(exc)(exc.errno, f"{exc.strerror or exc}{hint}", str(path)) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o666) -> None:
    with atomic_write(path, mode) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, mode: int = 0o666) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def fixed_zip_info(name: str) -> zipfile.ZipInfo:
    """A stored (uncompressed) zip entry with nothing from the clock or the platform in it."""
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # Unix, whatever the platform that writes it
    info.external_attr = 0o644 << 16
    return info


def _write_npz_to(f: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(fixed_zip_info(f"{name}.npy"), "w", force_zip64=True) as entry:
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
