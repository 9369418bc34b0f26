from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.idx import IdxFormatError, idx_bytes, read_idx, write_idx


def _images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("name", ["images.idx", "images.gz"])
def test_images_round_trip_raw_and_gzip(tmp_path: Path, name: str) -> None:
    images = _images()
    write_idx(tmp_path / name, images)
    result = read_idx(tmp_path / name)
    assert result.dtype == np.uint8 and result.shape == (5, 28, 28)
    np.testing.assert_array_equal(result, images)
    assert result.flags.writeable


def test_labels_round_trip(tmp_path: Path) -> None:
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    write_idx(tmp_path / "labels.gz", labels)
    result = read_idx(tmp_path / "labels.gz", kind="labels")
    assert result.shape == (5,)
    np.testing.assert_array_equal(result, labels)


def test_header_is_the_published_layout() -> None:
    data = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    assert data[:16] == struct.pack(">IIII", 2051, 2, 28, 28)
    assert len(data) == 16 + 2 * 784
    assert idx_bytes(np.zeros(3, dtype=np.uint8))[:8] == struct.pack(">II", 2049, 3)


def test_gzip_is_recognised_by_magic_bytes_whatever_the_name(tmp_path: Path) -> None:
    path = tmp_path / "labels.bin"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8))))
    np.testing.assert_array_equal(read_idx(path), np.arange(10))


def test_uncompressed_file_with_gz_name_is_read(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(idx_bytes(np.arange(10, dtype=np.uint8)))
    np.testing.assert_array_equal(read_idx(path), np.arange(10))


def test_gz_name_with_other_content_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "page.gz"
    path.write_bytes(b"<html>Not Found</html>")
    with pytest.raises(IdxFormatError, match=r"page\.gz: not a gzip file"):
        read_idx(path)


def test_write_is_deterministic(tmp_path: Path) -> None:
    images = _images()
    write_idx(tmp_path / "a.gz", images)
    write_idx(tmp_path / "b.gz", images)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    assert (tmp_path / "a.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime


def test_write_refuses_other_dtypes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x.gz", np.zeros(3, dtype=np.int64))


def test_wrong_magic_names_file_and_numbers(tmp_path: Path) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(struct.pack(">II", 0x0D03, 1) + b"\0" * 100)
    with pytest.raises(IdxFormatError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "3331" in message and "2051" in message and "2049" in message


def test_two_dimensional_file_is_refused(tmp_path: Path) -> None:
    write_idx(tmp_path / "flat.gz", np.zeros((2, 784), dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="bad magic number 2050"):
        read_idx(tmp_path / "flat.gz")


def test_wrong_image_size(tmp_path: Path) -> None:
    write_idx(tmp_path / "small.gz", np.zeros((2, 27, 28), dtype=np.uint8))
    with pytest.raises(IdxFormatError, match=r"images of 27x28 pixels, expected 28x28"):
        read_idx(tmp_path / "small.gz")


def test_kind_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "labels.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match=r"holds labels .* expected images"):
        read_idx(tmp_path / "labels.gz", kind="images")


@pytest.mark.parametrize("cut", [1, 100, 784 * 5 - 1])
def test_truncated_raw_file(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "images.idx"
    path.write_bytes(idx_bytes(_images())[:-cut])
    with pytest.raises(IdxFormatError) as info:
        read_idx(path)
    message = str(info.value)
    assert message.startswith(f"{path}: truncated")
    assert f"{16 + 5 * 784} bytes" in message and f"has {16 + 5 * 784 - cut} bytes" in message


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "images.idx"
    path.write_bytes(struct.pack(">II", 2051, 5))
    with pytest.raises(IdxFormatError, match="truncated header: 8 bytes, expected 16"):
        read_idx(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(IdxFormatError, match="too short"):
        read_idx(path)


def test_count_larger_than_data_in_gzip(tmp_path: Path) -> None:
    data = bytearray(idx_bytes(_images(3)))
    data[4:8] = struct.pack(">I", 4)  # header claims one image more than there is
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(IdxFormatError, match=r"truncated: header declares 4 images .* the "
                                             r"decompressed file has 2368 bytes"):
        read_idx(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)) + b"\0")
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(_images()))[:-20])
    with pytest.raises(IdxFormatError, match=r"images\.gz: truncated gzip stream"):
        read_idx(path)


def test_corrupt_gzip_stream(tmp_path: Path) -> None:
    data = bytearray(gzip.compress(idx_bytes(_images())))
    data[-6] ^= 0xFF  # inside the CRC32 trailer
    path = tmp_path / "images.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(IdxFormatError, match=r"images\.gz: corrupt gzip stream"):
        read_idx(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdxFormatError, match="file not found"):
        read_idx(tmp_path / "nope.gz")


def test_error_is_a_value_error() -> None:
    assert issubclass(IdxFormatError, ValueError)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 6), labels=st.booleans(), gz=st.booleans(), seed=st.integers(0, 99))
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, n: int, labels: bool,
                             gz: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (n,) if labels else (n, 28, 28)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path_factory.mktemp("rt") / ("a.gz" if gz else "a.idx")
    write_idx(path, array)
    np.testing.assert_array_equal(read_idx(path), array)
