"""Extra labelled images: 28x28 grayscale PNGs in one folder per class.

Layout: `<extra_dir>/<class>/<anything>.png`. The folder name gives the class, either as its
index `0`-`9` or as its Fashion-MNIST name from `class_names`, compared after lower-casing and
dropping everything that is not a letter or a digit. So `T-shirt/top` (whose slash cannot be
in a folder name) can be written `t-shirt_top`, `T-shirt-top`, `tshirt_top` or `TShirtTop`, and
`Ankle boot` as `ankle_boot`, `Ankle boot` or `ankle-boot`.

Accepted images: PNG files (extension `.png` in any case) of exactly 28x28 pixels in mode "L"
(8-bit grayscale, no alpha), the format of Fashion-MNIST itself. Other modes are refused rather
than converted, because a colour, alpha or 16-bit image is most likely not what its author
meant to add, and a silent conversion would hide that. For the same reason a gray PNG with a
tRNS chunk (one gray value declared transparent: alpha by another name) is refused, and so is
an animated PNG (an `acTL` chunk: only its first frame would be read) and a PNG whose image data
(IDAT) holds more than a 28x28 image needs, compressed or decompressed (a zlib bomb would
otherwise be decompressed, or silently cut, behind an image that looks fine).

Ignored: files without a `.png` extension anywhere (.gitignore, README, .DS_Store) and hidden
entries (names starting with "."; this covers macOS `._x.png` resource forks). Everything else
that does not fit — an unknown class folder, a PNG outside a class folder, a subfolder in a
class folder, an unreadable, mis-sized or wrong-mode image — is a problem. `validate_extra`
reports all of them at once; `load_extra` refuses to load a folder that has any.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core.errors import PipelineError
from pipeline.core.files import MAX_IMAGE_FILE_BYTES, read_bounded

IMAGE_SIZE = (28, 28)  # width, height
IMAGE_MODE = "L"
PNG_SUFFIX = ".png"


@dataclass(frozen=True)
class ExtraProblem:
    """One thing wrong with the extra folder, tied to the file or folder concerned."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ExtraDataError(PipelineError, ValueError):
    """The extra folder cannot be used; `problems` lists everything that is wrong with it."""

    def __init__(self, problems: Sequence[ExtraProblem]):
        self.problems = list(problems)
        count = len(self.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''} with the extra images:"]
        lines += [f"  - {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


class ImageError(PipelineError, ValueError):
    """One image that is not a readable 28x28 grayscale PNG; the message says what it is."""


@dataclass
class ExtraImages:
    """Extra images in load order (sorted by path), with what identifies each file."""

    images: np.ndarray  # (n, 28, 28) uint8
    labels: np.ndarray  # (n,) uint8
    paths: list[str] = field(default_factory=list)  # relative to the extra folder, with "/"
    md5s: list[str] = field(default_factory=list)  # of the PNG files' bytes

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self, n_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=n_classes)

    @property
    def content_hash(self) -> str:
        """SHA-256 over every file's relative path and MD5, in load order.

        Any added, removed, renamed, moved or edited PNG changes it; ignored files do not.
        """
        digest = hashlib.sha256()
        for path, md5 in zip(self.paths, self.md5s, strict=True):
            digest.update(f"{md5}  {path}\n".encode())
        return digest.hexdigest()


def normalise_class_name(name: str) -> str:
    """The form in which folder names and class names are compared: lower-case alphanumerics."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def class_index(folder_name: str, class_names: Sequence[str]) -> int | None:
    """The class that a folder name stands for (an index 0-9 or a class name), else None."""
    if re.fullmatch(r"[0-9]", folder_name) and int(folder_name) < len(class_names):
        return int(folder_name)
    key = normalise_class_name(folder_name)
    if not key:
        return None
    for index, name in enumerate(class_names):
        if normalise_class_name(name) == key:
            return index
    return None


def class_folder_name(index: int, class_names: Sequence[str]) -> str:
    """A filesystem-safe folder name for a class: `T-shirt/top` -> `t-shirt_top`."""
    return re.sub(r"[^0-9a-z-]+", "_", class_names[index].lower()).strip("_")


def _accepted_classes(class_names: Sequence[str]) -> str:
    return (
        f"0-{len(class_names) - 1} or a class name "
        f"({', '.join(class_folder_name(i, class_names) for i in range(len(class_names)))})"
    )


# What Pillow raises for a damaged or hostile file (SyntaxError: some malformed chunks).
_DECODE_ERRORS = (
    OSError, SyntaxError, EOFError, Image.DecompressionBombWarning, Image.DecompressionBombError
)


def _check_chunks(data: bytes, bit_depth: int) -> None:
    """Refuse, from the PNG's chunks, an animation, transparency, or image data (IDAT) beyond
    what a 28x28 gray image of `bit_depth` needs; a malformed chunk list is left to Pillow."""
    width, height = IMAGE_SIZE
    # One filter byte per row, Adam7 interlacing adds at most 26 more rows of 1 filter byte.
    raw_needed = height * (1 + -(-width * bit_depth // 8)) + 26
    compressed_allowed = raw_needed + raw_needed // 8 + 64  # stored blocks, zlib framing
    idat, position = [], 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"acTL":
            raise ImageError("animated PNG (an acTL chunk): save one 28x28 frame, without "
                             "animation")
        if kind == b"tRNS":
            raise ImageError("image mode 'L' with transparency (a tRNS chunk), expected 8-bit "
                             "grayscale without alpha; save it without transparency")
        if kind == b"IDAT":
            idat.append(body)
            if sum(map(len, idat)) > compressed_allowed:
                raise ImageError("more image data than a 28x28 image needs (over "
                                 f"{compressed_allowed} bytes of IDAT)")
        if kind == b"IEND":
            break
        position += 12 + length
    try:
        raw = zlib.decompressobj().decompress(b"".join(idat), raw_needed + 1)
    except zlib.error:
        return  # Pillow names the damage
    if len(raw) > raw_needed:
        raise ImageError("more image data than a 28x28 image needs (it decompresses to over "
                         f"{raw_needed} bytes)")


def decode_png(data: bytes) -> np.ndarray:
    """Decode one extra image, or raise ImageError saying what is wrong with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "PNG":
                    raise ImageError(f"not a PNG file (it is {image.format or 'unknown'})")
                if image.size != IMAGE_SIZE:
                    raise ImageError(
                        f"image is {image.size[0]}x{image.size[1]} pixels, expected "
                        f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}"
                    )
                if image.mode != IMAGE_MODE:
                    raise ImageError(
                        f"image mode is {image.mode!r}, expected {IMAGE_MODE!r} (8-bit "
                        "grayscale without alpha); convert it first, e.g. with Pillow's "
                        "Image.convert('L')"
                    )
                _check_chunks(data, data[24] if data[12:16] == b"IHDR" else 8)  # bit depth
                image.load()
                array = np.asarray(image, dtype=np.uint8).copy()
        except ImageError:
            raise
        except ValueError as exc:  # Pillow's own, for some malformed files
            raise ImageError(str(exc)) from None
        except UnidentifiedImageError:
            message = "unreadable image: not a PNG, nor any image format Pillow knows"
            raise ImageError(message) from None
        except _DECODE_ERRORS as exc:
            raise ImageError(f"unreadable image: {exc}") from None
    return array


def read_png(path: str | Path) -> np.ndarray:
    """Read one extra image as a (28, 28) uint8 array; ImageError names the file and problem."""
    path = Path(path)
    try:
        data = read_bounded(path, MAX_IMAGE_FILE_BYTES)
    except ValueError:
        raise  # read_bounded names the file (FileRefusedError)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from None
    try:
        return decode_png(data)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _is_png_name(path: Path) -> bool:
    return path.suffix.lower() == PNG_SUFFIX


def _scan(
    extra_dir: Path, class_names: Sequence[str]
) -> tuple[ExtraImages, list[ExtraProblem]]:
    problems: list[ExtraProblem] = []
    images: list[np.ndarray] = []
    labels: list[int] = []
    paths: list[str] = []
    md5s: list[str] = []
    if extra_dir.exists() and not extra_dir.is_dir():
        problems.append(ExtraProblem(extra_dir, "is not a folder"))
    entries = sorted(extra_dir.iterdir()) if extra_dir.is_dir() else []
    for entry in entries:
        if _is_hidden(entry):
            continue
        if not entry.is_dir():
            if _is_png_name(entry):
                problems.append(ExtraProblem(
                    entry, "image is not in a class folder; move it to "
                    f"{extra_dir}/<class>/, where <class> is {_accepted_classes(class_names)}",
                ))
            continue
        label = class_index(entry.name, class_names)
        if label is None:
            problems.append(ExtraProblem(
                entry, f"unknown class folder {entry.name!r}: expected "
                f"{_accepted_classes(class_names)}",
            ))
            continue
        for file in sorted(entry.iterdir()):
            if _is_hidden(file):
                continue
            if file.is_dir():
                problems.append(ExtraProblem(
                    file, "unexpected subfolder: images must sit directly in the class folder",
                ))
                continue
            if not _is_png_name(file):
                continue
            try:
                data = read_bounded(file, MAX_IMAGE_FILE_BYTES)
                array = decode_png(data)
            except (ValueError, OSError) as exc:
                problems.append(ExtraProblem(file, str(exc).removeprefix(f"{file}: ")))
                continue
            images.append(array)
            labels.append(label)
            paths.append(file.relative_to(extra_dir).as_posix())
            md5s.append(hashlib.md5(data, usedforsecurity=False).hexdigest())
    # Sorting the relative paths (not the per-folder listings) gives one global load order.
    order = sorted(range(len(paths)), key=paths.__getitem__)
    loaded = ExtraImages(
        images=(
            np.stack([images[i] for i in order]) if images
            else np.zeros((0, *IMAGE_SIZE[::-1]), dtype=np.uint8)
        ),
        labels=np.array([labels[i] for i in order], dtype=np.uint8),
        paths=[paths[i] for i in order],
        md5s=[md5s[i] for i in order],
    )
    return loaded, problems


def validate_extra(extra_dir: str | Path, class_names: Sequence[str]) -> list[ExtraProblem]:
    """Every problem in the extra folder (empty list: usable). A missing folder is fine."""
    return _scan(Path(extra_dir), class_names)[1]


def load_extra(extra_dir: str | Path, class_names: Sequence[str]) -> ExtraImages:
    """Load all extra images sorted by relative path; raise ExtraDataError listing all problems.

    A missing or empty folder gives zero images.
    """
    loaded, problems = _scan(Path(extra_dir), class_names)
    if problems:
        raise ExtraDataError(problems)
    return loaded


# --- Images compared by their pixels ----------------------------------------------------------
# A file's MD5 changes with its PNG encoding (compression level, chunks); the 784 pixel bytes do
# not. Training on an official test image would inflate the test score the champion is chosen
# on, and the same pixels under two labels teach the model nothing but noise.


def pixel_key(image: np.ndarray) -> bytes:
    """A 16-byte digest of an image's 784 uint8 pixels: equal pixels, equal keys."""
    pixels = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return hashlib.blake2b(pixels, digest_size=16).digest()


def index_pixels(images: np.ndarray) -> dict[bytes, int]:
    """pixel_key -> the index of its first image (10,000 test images: about 20 ms)."""
    index: dict[bytes, int] = {}
    for number, image in enumerate(images):
        index.setdefault(pixel_key(image), number)
    return index


def official_test_images_among(paths: Sequence[Path], images: np.ndarray,
                               test_index: dict[bytes, int],
                               test_file: str) -> list[ExtraProblem]:
    """One problem per image whose pixels are those of an official test image."""
    return [ExtraProblem(path, f"its pixels equal official test image #{test_index[key]} of "
                               f"{test_file}: a test image must not be trained on")
            for path, image in zip(paths, images, strict=True)
            if (key := pixel_key(image)) in test_index]


def label_conflicts(paths: Sequence[Path], images: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str]) -> list[ExtraProblem]:
    """One problem per image whose pixels appear under another label too, naming the others."""
    groups: dict[bytes, list[int]] = {}
    for number, image in enumerate(images):
        groups.setdefault(pixel_key(image), []).append(number)
    problems = []
    for members in groups.values():
        if len({int(labels[i]) for i in members}) < 2:
            continue
        for i in members:
            others = ", ".join(f"{paths[j]} ({class_names[int(labels[j])]!r})"
                               for j in members if int(labels[j]) != int(labels[i]))
            problems.append(ExtraProblem(
                paths[i], f"labelled {class_names[int(labels[i])]!r}, but the same pixels are "
                          f"labelled otherwise at {others}"))
    return problems


def check_extra_pixels(extra: ExtraImages, extra_dir: str | Path, test_images: np.ndarray,
                       test_file: str, class_names: Sequence[str]) -> None:
    """ExtraDataError listing every extra image that is an official test image, or whose
    pixels carry two labels; the split is then not made."""
    paths = [Path(extra_dir) / relative for relative in extra.paths]
    problems = official_test_images_among(paths, extra.images, index_pixels(test_images), test_file)
    problems += label_conflicts(paths, extra.images, extra.labels, class_names)
    if problems:
        raise ExtraDataError(problems)
