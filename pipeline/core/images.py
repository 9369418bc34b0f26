"""Images from what people send: one rule for pixels, whether they come in a file or in JSON.

A model sees uint8 rows of 784 pixels. `predict` reads files (PNG, IDX, `.npy`) and the serving
gate reads JSON; both hand their array to `flat_pixels`, so the two agree on what an image is:
shape (n, 784) or (n, 28, 28), at least one image, values that are integers 0..255. The two
dialects differ only in what may hold an integer (a `.npy` may store 3.0, JSON must write 3) and
in how a refusal reads, which each keeps word for word.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import MAX_ARRAY_FILE_BYTES, FileRefusedError, open_regular, read_bounded
from pipeline.core.idx import IMAGE_SHAPE, N_PIXELS, IdxFormatError, read_idx
from pipeline.core.labelled_images import read_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"


class InputError(PipelineError, ValueError):
    """An input file that cannot be classified; the message names the file."""


class PixelError(PipelineError, ValueError):
    """A request's pixels are not what the model was trained on; the message is one line."""


@dataclass(frozen=True)
class Dialect:
    """How one kind of input holds pixels, and how a refusal is worded for its readers.

    `kinds`: the numpy dtype kinds whose values are checked one by one ("f": integral floats
    count; "O": Python ints, as the JSON reader leaves them). The messages are format strings
    over `source`, `shape`, `dtype`, `image`, `pixel` and `value`.
    """

    error: type[PipelineError]
    kinds: str
    shape: str
    empty: str
    dtype: str
    value: str


# A NumPy file: uint8, or any integer or float array whose values are integers 0..255.
NPY = Dialect(
    InputError, kinds="iuf",
    shape="{source}: array of shape {shape}, expected (n, 784) or (n, 28, 28)",
    empty="{source}: the array holds no images",
    dtype="{source}: dtype {dtype} is not a pixel type; expected uint8, or integer values 0..255 "
          "in an integer or float array",
    value="{source}: pixel values must be integers in 0..255 ({dtype}); image {image} has "
          "{value} at pixel {pixel}")

# A JSON request: integers only (no floats, booleans or strings), each reported in one line.
JSON = Dialect(
    PixelError, kinds="iuO",
    shape="shape {shape}: expected (n, 784) or (n, 28, 28)",
    empty="no images: `inputs` must be a non-empty list of images",
    dtype="pixels must be JSON integers 0-255, found {dtype}",
    value="pixels must be integers 0-255: image {image} has {value} at pixel {pixel}")


def flat_pixels(array: np.ndarray, dialect: Dialect, source: str = "") -> np.ndarray:
    """uint8 (n, 784) from an array of pixel values, or the dialect's error naming what is wrong."""
    def refuse(message: str, **values: Any) -> PipelineError:
        return dialect.error(message.format(source=source, **values))

    if not (array.ndim == 2 and array.shape[1] == N_PIXELS
            or array.ndim == 3 and array.shape[1:] == IMAGE_SHAPE):
        raise refuse(dialect.shape, shape=array.shape)
    flat = array.reshape(len(array), N_PIXELS)
    if len(flat) == 0:
        raise refuse(dialect.empty)
    if flat.dtype == np.uint8:
        return flat
    kind = flat.dtype.kind
    if kind not in dialect.kinds:  # bool, complex, strings, dates...
        raise refuse(dialect.dtype, dtype=flat.dtype)
    bad = (flat < 0) | (flat > 255)
    if kind == "f":
        bad |= ~np.isfinite(flat) | (flat != np.round(flat))
    if bad.any():
        image, pixel = np.argwhere(bad)[0]
        value = flat[image, pixel]
        shown = value.item() if isinstance(value, np.generic) else value
        raise refuse(dialect.value, dtype=flat.dtype, image=image, pixel=pixel,
                     value=repr(shown))
    return flat.astype(np.uint8)


# --- JSON: the served API -------------------------------------------------------------------


def json_pixels(inputs: Any, may_hold_booleans: bool = True) -> np.ndarray:
    """uint8 (n, 784) from a request's JSON `inputs`; PixelError says what is wrong, in one line.

    numpy reads a list of Python ints and bools as int64 (True as 1), so the fast path, one C
    conversion, is only taken when the caller knows the request holds no JSON true/false; any
    other request gets the exact check of each value's type.
    """
    if not isinstance(inputs, list) or not inputs:
        raise PixelError(JSON.empty)
    array = None
    if not may_hold_booleans:
        try:
            array = np.asarray(inputs)
        except (ValueError, OverflowError):  # ragged, or an integer beyond 64 bits
            array = None
    if array is None or array.dtype.kind not in "iu":
        array = _exact_integers(inputs)
    return flat_pixels(array, JSON)


def _exact_integers(inputs: list) -> np.ndarray:
    """The pixels as an object array of Python ints, refusing any other JSON type by name."""
    different = PixelError("images of different shapes: expected (n, 784) or (n, 28, 28)")
    try:
        array = np.array(inputs, dtype=object)
    except ValueError:  # nested rows of different lengths
        raise different from None
    kinds = set(map(type, array.ravel().tolist()))
    if list in kinds:  # numpy keeps rows of different lengths as lists
        raise different
    if kinds != {int}:
        names = {bool: "booleans", float: "floats", str: "strings", dict: "objects",
                 type(None): "nulls"}
        found = ", ".join(sorted(names.get(kind, kind.__name__) for kind in kinds - {int}))
        raise PixelError(JSON.dtype.format(dtype=found))
    return array  # Python ints, compared exactly: 10**30 is out of range, not an overflow


# --- Files: predict's inputs ----------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """The images of one input file, flattened to (n, 784) uint8 as the model expects."""

    source: str
    images: np.ndarray
    single: bool  # one image per file (PNG): shown without an index


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(read_bounded(path, MAX_ARRAY_FILE_BYTES)), allow_pickle=False)
    except FileRefusedError as exc:
        raise InputError(str(exc)) from None
    except (ValueError, OSError, EOFError) as exc:  # object arrays, bad header, truncation
        raise InputError(f"{path}: not a readable .npy array: {exc}") from None
    if not isinstance(array, np.ndarray):  # np.load opened a .npz archive
        array.close()
        raise InputError(f"{path}: a .npz archive, expected one array saved with numpy.save")
    return flat_pixels(array, NPY, str(path))


def read_input(source: str) -> Batch:
    """The images of one input file, whichever of the accepted formats it is in."""
    path = Path(source)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass the image files themselves, e.g. {path}/*.png")
    try:
        with open_regular(path, MAX_ARRAY_FILE_BYTES) as f:  # no FIFO, device or huge file
            head = f.read(len(PNG_SIGNATURE))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except FileRefusedError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".png" or head.startswith(PNG_SIGNATURE):
        try:
            return Batch(source, read_png(path).reshape(1, N_PIXELS), single=True)
        except ValueError as exc:  # read_png names the file
            raise InputError(str(exc)) from None
    if suffix == ".npy" or head.startswith(NPY_MAGIC):
        return Batch(source, _read_npy(path), single=False)
    try:
        images = read_idx(path, kind="images")
    except IdxFormatError as exc:
        hint = ("; expected a PNG image, a .npy array or an IDX image file"
                if "bad magic number" in str(exc) or "not a gzip file" in str(exc) else "")
        raise InputError(f"{exc}{hint}") from None
    if len(images) == 0:
        raise InputError(f"{path}: the IDX file holds no images")
    return Batch(source, images.reshape(len(images), N_PIXELS), single=False)


def read_inputs(sources: Sequence[str]) -> list[Batch]:
    """All inputs, or InputError listing every bad one: fix them all in one go."""
    batches, problems = [], []
    for source in sources:
        try:
            batches.append(read_input(source))
        except InputError as exc:
            problems.append(str(exc))
    if problems:
        raise InputError("\n".join(problems))
    return batches
