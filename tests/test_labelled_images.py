from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.labelled_images import (
    ExtraDataError,
    class_folder_name,
    class_index,
    load_extra,
    read_png,
    validate_extra,
)
from tests.synthetic import CLASS_NAMES, make_images, write_extra_folder, write_png


def _image(value: int = 128) -> np.ndarray:
    return np.full((28, 28), value, dtype=np.uint8)


@pytest.mark.parametrize(("folder", "expected"), [
    ("0", 0), ("9", 9), ("t-shirt_top", 0), ("T-shirt-top", 0), ("tshirt-top", 0),
    ("TShirtTop", 0), ("T-shirt top", 0), ("trouser", 1), ("ankle_boot", 9),
    ("Ankle boot", 9), ("ANKLE-BOOT", 9), ("sneaker", 7),
])
def test_class_folder_names(folder: str, expected: int) -> None:
    assert class_index(folder, CLASS_NAMES) == expected


@pytest.mark.parametrize("folder", ["10", "-1", "00", "tshirt", "boots", "", "___", "misc"])
def test_unknown_class_folder_names(folder: str) -> None:
    assert class_index(folder, CLASS_NAMES) is None


def test_canonical_folder_names_round_trip() -> None:
    names = [class_folder_name(i, CLASS_NAMES) for i in range(10)]
    assert names[0] == "t-shirt_top" and names[9] == "ankle_boot"
    assert [class_index(n, CLASS_NAMES) for n in names] == list(range(10))


def test_missing_or_empty_folder_gives_no_images(tmp_path: Path) -> None:
    for directory in (tmp_path / "missing", tmp_path):
        extra = load_extra(directory, CLASS_NAMES)
        assert len(extra) == 0
        assert extra.images.shape == (0, 28, 28) and extra.images.dtype == np.uint8
        assert extra.labels.shape == (0,) and extra.labels.dtype == np.uint8
        assert validate_extra(directory, CLASS_NAMES) == []


def test_good_folder_with_names_and_indices(tmp_path: Path) -> None:
    counts = write_extra_folder(tmp_path, {0: 2, "3": 3, "Ankle boot": 1, "sneaker": 2})
    (tmp_path / ".gitignore").write_text("*\n")
    (tmp_path / "README.md").write_text("extra images\n")
    (tmp_path / "3" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "3" / "._img_0000.png").write_bytes(b"resource fork")
    (tmp_path / "3" / "notes.txt").write_text("ignored")
    (tmp_path / ".cache").mkdir()
    extra = load_extra(tmp_path, CLASS_NAMES)
    assert counts == {0: 2, 3: 3, 9: 1, 7: 2}
    assert len(extra) == 8
    assert extra.paths == sorted(extra.paths)
    assert extra.paths[0] == "3/img_0000.png"
    np.testing.assert_array_equal(extra.counts(10), [2, 0, 0, 3, 0, 0, 0, 2, 0, 1])
    first = read_png(tmp_path / "3" / "img_0000.png")
    np.testing.assert_array_equal(extra.images[0], first)
    np.testing.assert_array_equal(first, make_images([3, 3, 3], seed=7919)[0])


def test_content_hash_tracks_files_but_not_ignored_ones(tmp_path: Path) -> None:
    write_extra_folder(tmp_path, {1: 2})
    before = load_extra(tmp_path, CLASS_NAMES).content_hash
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_extra(tmp_path, CLASS_NAMES).content_hash == before
    write_png(tmp_path / "trouser" / "img_0000.png", _image(7))
    assert load_extra(tmp_path, CLASS_NAMES).content_hash != before


def test_uppercase_extension_is_accepted(tmp_path: Path) -> None:
    write_png(tmp_path / "bag" / "IMG.PNG", _image())
    assert load_extra(tmp_path, CLASS_NAMES).labels.tolist() == [8]


@pytest.mark.parametrize(("array", "mode", "message"), [
    (np.zeros((28, 27), np.uint8), None, "image is 27x28 pixels, expected 28x28"),
    (np.zeros((32, 32), np.uint8), None, "image is 32x32 pixels, expected 28x28"),
    (np.zeros((28, 28, 3), np.uint8), None, "image mode is 'RGB', expected 'L'"),
    (np.zeros((28, 28, 4), np.uint8), None, "image mode is 'RGBA', expected 'L'"),
    (np.zeros((28, 28), np.uint8), "LA", "image mode is 'LA', expected 'L'"),
    (np.zeros((28, 28), np.uint8), "1", "image mode is '1', expected 'L'"),
    (np.zeros((28, 28), np.uint8), "P", "image mode is 'P', expected 'L'"),
    (np.zeros((28, 28), np.uint16), None, "image mode is 'I;16', expected 'L'"),
])
def test_bad_images(tmp_path: Path, array: np.ndarray, mode: str | None, message: str) -> None:
    path = write_png(tmp_path / "coat" / "bad.png", array, mode=mode)
    problems = validate_extra(tmp_path, CLASS_NAMES)
    assert len(problems) == 1 and problems[0].path == path
    assert str(problems[0]).startswith(f"{path}: {message}")
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {message}")):
        read_png(path)


def test_unreadable_and_non_png_files(tmp_path: Path) -> None:
    (tmp_path / "dress").mkdir()
    (tmp_path / "dress" / "garbage.png").write_bytes(b"definitely not an image")
    png = write_png(tmp_path / "dress" / "cut.png", _image()).read_bytes()
    (tmp_path / "dress" / "cut.png").write_bytes(png[: len(png) // 2])
    from PIL import Image

    Image.fromarray(_image()).save(tmp_path / "dress" / "photo.png", format="JPEG")
    problems = {p.path.name: p.message for p in validate_extra(tmp_path, CLASS_NAMES)}
    assert problems["garbage.png"].startswith("unreadable image")
    assert problems["cut.png"].startswith("unreadable image")
    assert problems["photo.png"] == "not a PNG file (it is JPEG)"


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    write_extra_folder(tmp_path, {2: 2})
    write_png(tmp_path / "pullover" / "rgb.png", np.zeros((28, 28, 3), np.uint8))
    write_png(tmp_path / "pullover" / "big.png", np.zeros((29, 28), np.uint8))
    write_png(tmp_path / "shoes" / "x.png", _image())
    write_png(tmp_path / "loose.png", _image())
    write_png(tmp_path / "2" / "nested" / "deep.png", _image())
    problems = validate_extra(tmp_path, CLASS_NAMES)
    by_name = {p.path.name: p.message for p in problems}
    assert set(by_name) == {"rgb.png", "big.png", "shoes", "loose.png", "nested"}
    assert by_name["shoes"].startswith("unknown class folder 'shoes': expected 0-9 or a class")
    assert "t-shirt_top" in by_name["shoes"] and "ankle_boot" in by_name["shoes"]
    assert by_name["loose.png"].startswith("image is not in a class folder")
    assert by_name["nested"].startswith("unexpected subfolder")
    with pytest.raises(ExtraDataError) as info:
        load_extra(tmp_path, CLASS_NAMES)
    assert len(info.value.problems) == 5
    assert str(info.value).startswith("5 problems with the extra images:")
    for problem in problems:
        assert str(problem.path) in str(info.value)


def test_extra_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "extra").write_text("oops")
    with pytest.raises(ExtraDataError, match="is not a folder"):
        load_extra(tmp_path / "extra", CLASS_NAMES)


# --- PNGs that decode to a plausible image but must not be used ---------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def crafted_pngs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Hostile or misleading 28x28 gray PNGs, each with the reason it must be refused."""
    import struct
    import zlib

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
    rows = b"".join(b"\x00" + bytes(28) for _ in range(28))
    bomb = zlib.compress(rows + bytes(20_000_000), 9)  # 20 MB of zeros after the image
    files = {
        "bomb": (b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", bomb) + _chunk(b"IEND", b""),
                 "more image data than a 28x28 image needs"),
        "padded": (b"\x89PNG\r\n\x1a\n" + header
                   + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IDAT", bytes(100_000))
                   + _chunk(b"IEND", b""), "more image data than a 28x28 image needs"),
    }
    paths = {}
    for name, (data, reason) in files.items():
        (folder / f"{name}.png").write_bytes(data)
        paths[name] = (folder / f"{name}.png", reason)
    frames = [Image.fromarray(np.zeros((28, 28), np.uint8)),
              Image.fromarray(np.full((28, 28), 200, np.uint8))]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:])
    paths["animated"] = (folder / "animated.png", "animated PNG")
    Image.fromarray(_image(7)).save(folder / "transparent.png", transparency=7)
    paths["transparent"] = (folder / "transparent.png", "transparency (a tRNS chunk)")
    return paths


@pytest.mark.parametrize("name", ["bomb", "padded", "animated", "transparent"])
def test_animated_oversized_and_transparent_pngs_are_refused(tmp_path: Path, name: str) -> None:
    path, reason = crafted_pngs(tmp_path / "coat")[name]
    for other, _ in crafted_pngs(tmp_path / "coat").values():
        if other != path:
            other.unlink()
    problems = validate_extra(tmp_path, CLASS_NAMES)
    assert len(problems) == 1 and problems[0].path == path
    assert reason in str(problems[0]), str(problems[0])
    with pytest.raises(ValueError, match=re.escape(reason)):
        read_png(path)


def test_a_plain_gray_png_with_several_idat_chunks_still_reads(tmp_path: Path) -> None:
    import struct
    import zlib

    rows = b"".join(b"\x00" + bytes(range(i, i + 28)) for i in range(28))
    compressed = zlib.compress(rows)
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", compressed[:100]) + _chunk(b"IDAT", compressed[100:])
            + _chunk(b"IEND", b""))
    (tmp_path / "coat").mkdir()
    (tmp_path / "coat" / "split.png").write_bytes(data)
    image = read_png(tmp_path / "coat" / "split.png")
    assert image[5, 3] == 8 and image.shape == (28, 28)
