from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.files import (
    ZIP_DATE_TIME,
    atomic_write,
    atomic_write_bytes,
    is_temp_file_of,
    md5_bytes,
    md5sum,
    npz_bytes,
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
