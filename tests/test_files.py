from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.files import (
    MAX_ARRAY_FILE_BYTES,
    ZIP_DATE_TIME,
    FileRefusedError,
    atomic_write,
    atomic_write_bytes,
    is_temp_file_of,
    md5_bytes,
    md5sum,
    npz_bytes,
    read_bounded,
    write_npz,
)


def test_md5_of_known_values(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert md5sum(path) == "900150983cd24fb0d6963f7d28e17f72"
    assert md5_bytes(b"") == "d41d8cd98f00b204e9800998ecf8427e"


def test_md5_in_small_chunks_matches(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "data"
    path.write_bytes(data)
    assert md5sum(path, chunk_size=7) == md5_bytes(data)


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_failure_without_old_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "new.bin") as f:
        f.write(b"partial")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_temp_file_is_in_the_same_directory_and_recognisable(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "out.bin") as f:
        f.write(b"x")
        (temp,) = [p for p in tmp_path.iterdir() if p.name != "out.bin"]
        assert is_temp_file_of(temp, "out.bin")
        assert not is_temp_file_of(temp, "other.bin")


def test_atomic_write_respects_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


def test_npz_round_trip_and_fixed_metadata(tmp_path: Path) -> None:
    arrays = {"X": np.arange(12, dtype=np.uint8).reshape(3, 4), "y": np.array([1, 2, 3], np.uint8)}
    write_npz(tmp_path / "a.npz", arrays)
    with np.load(tmp_path / "a.npz") as loaded:
        assert list(loaded.keys()) == ["X", "y"]
        np.testing.assert_array_equal(loaded["X"], arrays["X"])
        np.testing.assert_array_equal(loaded["y"], arrays["y"])
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert {info.date_time for info in zf.infolist()} == {ZIP_DATE_TIME}
    assert (tmp_path / "a.npz").read_bytes() == npz_bytes(arrays)


def test_npz_bytes_do_not_depend_on_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    arrays = {"X": np.ones((2, 2), dtype=np.uint8)}
    first = npz_bytes(arrays)
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)
    monkeypatch.setattr(time, "localtime", lambda *a: (2033, 5, 18, 3, 33, 20, 2, 138, 0))
    assert npz_bytes(arrays) == first
    assert np.load(io.BytesIO(first))["X"].sum() == 4


def test_a_full_disk_names_the_file_and_leaves_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    path = tmp_path / "models" / "model.skops"
    atomic_write_bytes(path, b"previous")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as raised:
        atomic_write_bytes(path, b"new model")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert str(path) in str(raised.value) and "free some space" in str(raised.value)
    assert path.read_bytes() == b"previous" and os.listdir(path.parent) == ["model.skops"]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-symlink", "sparse-2gb", "folder"])
def test_bounded_reads_refuse_what_is_not_a_small_regular_file(tmp_path: Path,
                                                               kind: str) -> None:
    path = tmp_path / "x.png"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: opening it for reading would block for ever
    elif kind == "dev-zero-symlink":
        path.symlink_to("/dev/zero")
    elif kind == "sparse-2gb":
        with open(path, "wb") as f:
            f.truncate(2 << 30)
    else:
        path.mkdir()
    expected = {"fifo": "a FIFO", "dev-zero-symlink": "a character device",
                "sparse-2gb": f"{2 << 30} bytes, more than", "folder": "a folder"}[kind]
    with pytest.raises(FileRefusedError, match=f"^{path}: {expected}"):
        read_bounded(path, MAX_ARRAY_FILE_BYTES)


def test_bounded_reads_read_a_regular_file_and_its_symlink(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert read_bounded(tmp_path / "link", 3) == b"abc"
    with pytest.raises(FileRefusedError, match="4 bytes, more than the 3 bytes"):
        (tmp_path / "a").write_bytes(b"abcd")
        read_bounded(tmp_path / "a", 3)


def test_a_private_file_is_private_from_the_start_and_leaves_nothing_on_failure(
        tmp_path: Path) -> None:
    import stat

    from pipeline.core.files import atomic_write, atomic_write_text

    target = tmp_path / "team.env"
    atomic_write_text(target, "PASSWORD=x\n", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(RuntimeError), atomic_write(target, mode=0o600) as f:
        f.write(b"PASSWORD=y\n")
        (written,) = [p for p in tmp_path.iterdir() if p != target]
        assert stat.S_IMODE(written.stat().st_mode) == 0o600  # never readable by others
        raise RuntimeError("the disk filled up")
    assert sorted(tmp_path.iterdir()) == [target] and target.read_text() == "PASSWORD=x\n"
