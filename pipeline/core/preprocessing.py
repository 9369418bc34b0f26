"""The fixed per-pixel feature maps and the standardisation that SoftmaxRegression builds in.

Each pixel x (x/255 in [0, 1]) becomes 1 + `hinges` features computed from that pixel alone: its
transformed value (x**power, sqrt(x) or x) and the hinge functions max(x - k, 0) at `hinges`
evenly spaced knots k = 1/(hinges+1), 2/(hinges+1), ... A linear layer on these features is still
an additive model, one piecewise function of each pixel's intensity summed over pixels; no
feature mixes pixels. The features of pixel p sit next to each other (columns p*(1+hinges) ...).

Plain functions (used by the estimator) plus `PixelFeatures`, the same steps as a scikit-learn
transformer, so a baseline such as LogisticRegression can be fed exactly the features our model
sees. Everything is float32 and works in row chunks, so each chunk is transformed, measured and
scaled while it is still in cache, and temporaries stay small.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

TRANSFORMS = (None, "sqrt", "power")
SCALINGS = ("minmax", "standard")
# uint8 stays uint8 (the lookup-table path); other numbers become float32.
ACCEPTED_DTYPES = [np.float32, np.float64, np.uint8]
PIXEL_MAX = 255.0
# Pixels near the image border are almost always 0; without a floor their rare non-zero values
# would become huge standardised features that dominate the gradient. In units of x/255.
STD_FLOOR = 0.05
CHUNK_ROWS = 1024
# scikit-learn's parameter constraints, shared with SoftmaxRegression (same names and meaning).
PIXEL_PARAMETER_CONSTRAINTS: dict = {
    "pixel_transform": [StrOptions({t for t in TRANSFORMS if t is not None}), None],
    "power": [Interval(numbers.Real, 0, math.inf, closed="neither")],
    "scaling": [StrOptions(set(SCALINGS))],
    "hinges": [Interval(numbers.Integral, 0, None, closed="left")],
}


def row_chunks(n_rows: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, int]]:
    for start in range(0, n_rows, chunk_rows):
        yield start, min(start + chunk_rows, n_rows)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def spare_core() -> bool:
    """Whether a second thread would find an idle core: two usable cores, and no other task
    runnable on the machine at this moment (Linux's /proc/loadavg; elsewhere the 1-minute load
    average below 1.5).

    With every core busy (two `make tune` workers on two cores, other jobs), a second thread
    only adds hand-overs. The choice never changes the result (see `_each_chunk` and the
    estimator's `_BatchGradients`), only where the work runs.
    """
    if usable_cores() < 2:
        return False
    try:  # "0.52 0.58 0.59 1/467 12345": runnable tasks (this thread included) / all tasks
        runnable = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        try:
            return os.getloadavg()[0] < 1.5
        except OSError:
            return False
    return runnable <= 1


def _each_chunk(work: Callable[[int, int], object], n_rows: int) -> Iterator[object]:
    """work(start, stop) for each row chunk, on two threads when a second core is idle.

    numpy releases the GIL in the gathers and counts these chunks are made of, so two threads
    take about half the time. The results come back in chunk order, and each chunk's work is
    the same whichever thread does it, so the output never depends on the threads.
    """
    chunks = list(row_chunks(n_rows))
    if len(chunks) < 2 or not spare_core():
        yield from (work(start, stop) for start, stop in chunks)
        return
    with ThreadPoolExecutor(2) as pool:
        yield from pool.map(lambda chunk: work(*chunk), chunks)


def hinge_knots(hinges: int) -> np.ndarray:
    """The knots of the hinge features, evenly spaced inside (0, 1) in units of x/255."""
    return (np.arange(1, hinges + 1, dtype=np.float32) / np.float32(hinges + 1))


def _transform_inplace(values: np.ndarray, transform: str | None, power: float,
                       hinges: int) -> None:
    """values[..., 0] holds x; fill values[..., j] with the j-th feature of x/255.

    Feature 0 is the signed power (negative inputs, not pixels but legal, stay finite);
    feature j >= 1 is max(x/255 - k_j, 0).
    """
    scaled = values[..., 0]
    scaled *= np.float32(1.0 / PIXEL_MAX)
    for knot, column in zip(hinge_knots(hinges), range(1, hinges + 1), strict=True):
        np.subtract(scaled, knot, out=values[..., column])
        np.maximum(values[..., column], np.float32(0.0), out=values[..., column])
    if transform is None:
        return
    negative = np.signbit(scaled)
    np.abs(scaled, out=scaled)
    if transform == "sqrt":
        np.sqrt(scaled, out=scaled)
    else:
        np.power(scaled, np.float32(power), out=scaled)
    np.negative(scaled, out=scaled, where=negative)


def n_output_features(n_pixels: int, hinges: int) -> int:
    return n_pixels * (1 + hinges)


def _value_table(transform: str | None, power: float, hinges: int) -> np.ndarray:
    """(256, 1 + hinges) float32: the features of each uint8 value."""
    table = np.zeros((256, 1 + hinges), dtype=np.float32)
    table[:, 0] = np.arange(256, dtype=np.float32)
    _transform_inplace(table, transform, power, hinges)
    return table


def _gather(table: np.ndarray, indices: np.ndarray, out: np.ndarray) -> None:
    """out[i, p, :] = table[indices[i, p], :], each entry's floats moved as one opaque item
    (a 1-D gather, about twice as fast as numpy's gather of rows along axis 0)."""
    item = np.dtype((np.void, table.itemsize * table.shape[-1]))
    np.take(table.view(item).ravel(), indices, mode="clip",
            out=out.reshape(*indices.shape, table.shape[-1]).view(item).reshape(indices.shape))


def _transform_chunk(X: np.ndarray, out: np.ndarray, transform: str | None, power: float,
                     hinges: int) -> None:
    """Write the features of the rows X into `out`, (rows, n_pixels * (1 + hinges))."""
    if X.dtype == np.uint8:
        # A 256-entry lookup table per feature: one gather instead of arithmetic per pixel, and
        # bit-identical to transforming the same values given as floats.
        _gather(_value_table(transform, power, hinges), X.astype(np.intp), out)
    else:
        per_pixel = out.reshape(X.shape[0], X.shape[1], 1 + hinges)
        per_pixel[..., 0] = X
        _transform_inplace(per_pixel, transform, power, hinges)


def _check_transform(transform: str | None) -> None:
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def transform_pixels(X: np.ndarray, transform: str | None, power: float = 0.5,
                     hinges: int = 0) -> np.ndarray:
    """The fixed per-pixel features of x/255 (see the module docstring) as a new float32 array."""
    _check_transform(transform)
    transformed = np.empty((X.shape[0], n_output_features(X.shape[1], hinges)), dtype=np.float32)
    for start, stop in row_chunks(X.shape[0]):
        _transform_chunk(X[start:stop], transformed[start:stop], transform, power, hinges)
    return transformed


def _as_pixels(X: np.ndarray) -> np.ndarray | None:
    """X as uint8 if it holds only whole numbers 0..255, else None.

    Such floats are pixels given as floats: taking the uint8 path for them gives features and
    statistics bit-identical to those of the same images as uint8.
    """
    if X.dtype == np.uint8:
        return X
    with np.errstate(invalid="ignore"):
        pixels = X.astype(np.uint8)
    return pixels if np.array_equal(pixels, X) else None


def _pixel_value_indices(pixels: np.ndarray) -> np.ndarray:
    """pixel index * 256 + value: the row of a (n_pixels * 256) per-pixel table."""
    indices = pixels.astype(np.intp)
    indices += np.arange(pixels.shape[1], dtype=np.intp) * 256
    return indices


def _statistics_from_counts(counts: np.ndarray, n_samples: int, transform: str | None,
                            power: float, hinges: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and variance of each feature from how often each value occurs at each pixel
    (`counts`, n_pixels * 256). Elementwise products and numpy sums, not BLAS: their rounding
    never depends on threads."""
    n_pixels = counts.size // 256
    weights = counts.reshape(n_pixels, 256, 1) / n_samples
    values = _value_table(transform, power, hinges).astype(np.float64)
    mean = (weights * values).sum(axis=1)
    variance = (weights * np.square(values - mean[:, None, :])).sum(axis=1)
    return mean.ravel(), variance.ravel()


class _Moments:
    """float64 sums of float32 feature chunks, shifted by the first row to keep
    E[d^2] - E[d]^2 accurate for features far from zero."""

    def __init__(self, n_features: int, chunk_rows: int):
        self.buffer = np.empty((chunk_rows, n_features), dtype=np.float32)
        self.shift = None
        self.n_samples = 0
        self.sums = np.zeros(n_features, dtype=np.float64)
        self.sums_of_squares = np.zeros(n_features, dtype=np.float64)

    def add(self, chunk: np.ndarray) -> None:
        if self.shift is None:
            self.shift = chunk[0].copy()
        deviations = self.buffer[: chunk.shape[0]]
        np.subtract(chunk, self.shift, out=deviations)
        self.sums += deviations.sum(axis=0, dtype=np.float64)
        deviations *= deviations
        self.sums_of_squares += deviations.sum(axis=0, dtype=np.float64)
        self.n_samples += chunk.shape[0]

    def mean_and_variance(self) -> tuple[np.ndarray, np.ndarray]:
        mean_deviation = self.sums / self.n_samples
        variance = np.maximum(self.sums_of_squares / self.n_samples - mean_deviation**2, 0.0)
        return self.shift + mean_deviation, variance


def _mean_and_scale(mean: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (mean.astype(np.float32),
            np.maximum(np.sqrt(variance), STD_FLOOR).astype(np.float32))


def feature_statistics(
    X: np.ndarray, transform: str | None, power: float = 0.5, hinges: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and (floored) std of the features of X, without building the features.

    For pixels (uint8, or whole-number floats 0..255) each feature is a function of one pixel's
    value, so the statistics come exactly from how often each value occurs at each pixel: a
    count over the uint8 images (a twelfth of the bytes of the float32 features), then float64
    sums over 256 values. Other inputs are transformed chunk by chunk and summed in float64.
    """
    _check_transform(transform)
    n_samples, n_pixels = X.shape
    pixels = _as_pixels(X)
    if pixels is not None:
        counts = np.zeros(n_pixels * 256, dtype=np.intp)
        for chunk_counts in _each_chunk(
            lambda start, stop: np.bincount(_pixel_value_indices(pixels[start:stop]).ravel(),
                                            minlength=n_pixels * 256),
            n_samples,
        ):
            counts += chunk_counts  # integer sums: the same in any order
        return _mean_and_scale(*_statistics_from_counts(counts, n_samples, transform, power,
                                                        hinges))
    n_features = n_output_features(n_pixels, hinges)
    moments = _Moments(n_features, min(CHUNK_ROWS, n_samples))
    chunk = np.empty((min(CHUNK_ROWS, n_samples), n_features), dtype=np.float32)
    for start, stop in row_chunks(n_samples):
        _transform_chunk(X[start:stop], chunk[: stop - start], transform, power, hinges)
        moments.add(chunk[: stop - start])
    return _mean_and_scale(*moments.mean_and_variance())


def features_and_statistics(
    X: np.ndarray, transform: str | None, power: float, hinges: int,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unscaled features of X[rows] (of X if `rows` is None), and the mean and (floored) std
    of each feature over X, from one pass over X.

    For pixels, each chunk's values serve twice while they are in cache: a gather from the
    256-value table (3 KB, where the table of standardised values per pixel is 2.4 MB) and the
    count that gives the statistics (`feature_statistics`, the same bits). The rows are taken
    chunk by chunk, so a shuffled order costs no copy of X.
    """
    _check_transform(transform)
    n_samples, n_pixels = X.shape
    pixels = _as_pixels(X)
    if pixels is None:
        features = transform_pixels(X if rows is None else X[rows], transform, power, hinges)
        moments = _Moments(features.shape[1], min(CHUNK_ROWS, n_samples))
        for start, stop in row_chunks(n_samples):
            moments.add(features[start:stop])
        return (features, *_mean_and_scale(*moments.mean_and_variance()))
    table = _value_table(transform, power, hinges)
    features = np.empty((n_samples, n_output_features(n_pixels, hinges)), dtype=np.float32)
    offsets = np.arange(n_pixels, dtype=np.intp) * 256

    def fill_and_count(start: int, stop: int) -> np.ndarray:
        chunk = pixels[start:stop] if rows is None else np.take(pixels, rows[start:stop], axis=0)
        indices = chunk.astype(np.intp)
        _gather(table, indices, features[start:stop])
        indices += offsets
        return np.bincount(indices.ravel(), minlength=n_pixels * 256)

    counts = np.zeros(n_pixels * 256, dtype=np.intp)
    for chunk_counts in _each_chunk(fill_and_count, n_samples):
        counts += chunk_counts  # integer sums: the same in any order
    statistics = _statistics_from_counts(counts, n_samples, transform, power, hinges)
    return (features, *_mean_and_scale(*statistics))


def standardised_features(
    X: np.ndarray, transform: str | None, power: float, hinges: int, mean: np.ndarray,
    scale: np.ndarray,
) -> np.ndarray:
    """The features of X standardised with `mean` and `scale`, as a new float32 array.

    For pixels, one gather from a per-pixel table of the standardised features of each of the
    256 values (the table is computed with the same float32 operations as
    `standardise_inplace`, so both give the same bits): one write of the output instead of a
    write, then a read and a write to standardise it.
    """
    _check_transform(transform)
    pixels = _as_pixels(X)
    if pixels is None:
        return standardise_inplace(transform_pixels(X, transform, power, hinges), mean, scale)
    n_samples, n_pixels = pixels.shape
    per_feature = 1 + hinges
    table = _value_table(transform, power, hinges)[None] - mean.reshape(n_pixels, 1, per_feature)
    table *= (np.float32(1.0) / scale).reshape(n_pixels, 1, per_feature)
    table = table.reshape(n_pixels * 256, per_feature)
    features = np.empty((n_samples, n_output_features(n_pixels, hinges)), dtype=np.float32)

    def fill(start: int, stop: int) -> None:
        _gather(table, _pixel_value_indices(pixels[start:stop]), features[start:stop])

    for _ in _each_chunk(fill, n_samples):
        pass
    return features


def standardise_inplace(features: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(features - mean) / scale, overwriting the float32 `features` to save a 4n-byte copy."""
    inverse_scale = np.float32(1.0) / scale
    for start, stop in row_chunks(features.shape[0]):
        chunk = features[start:stop]
        chunk -= mean
        chunk *= inverse_scale
    return features


class PixelFeatures(TransformerMixin, BaseEstimator):
    """SoftmaxRegression's preprocessing as a transformer: per-pixel features, then scaling.

    Parameters and defaults mirror SoftmaxRegression's `pixel_transform`, `power`, `hinges` and
    `scaling`. Output has n_pixels * (1 + hinges) columns.
    Output is float32. Fitted attributes are numpy arrays only, so skops can save it.
    """

    _parameter_constraints: dict = PIXEL_PARAMETER_CONSTRAINTS

    def __init__(
        self, *, pixel_transform: str | None = "power", power: float = 0.25,
        scaling: str = "standard", hinges: int = 2,
    ):
        self.pixel_transform = pixel_transform
        self.power = power
        self.scaling = scaling
        self.hinges = hinges

    def fit(self, X, y=None):
        self._fit(X)
        return self

    def fit_transform(self, X, y=None, **fit_params):
        return self._features(self._fit(X))

    def fit_transform_unscaled(self, X, rows: np.ndarray | None = None) -> np.ndarray:
        """Fit, and return the features of X[rows] (of X if None) before scaling.

        One pass over X for both (`features_and_statistics`). For SoftmaxRegression, which
        folds the scaling into its weights while it trains instead of building scaled features.
        """
        self._validate_params()
        X = validate_data(self, X, dtype=ACCEPTED_DTYPES, order="C")
        if self.scaling == "minmax":
            self.mean_ = self.scale_ = None
            return transform_pixels(X if rows is None else X[rows], self.pixel_transform,
                                    self.power, self.hinges)
        features, self.mean_, self.scale_ = features_and_statistics(
            X, self.pixel_transform, self.power, self.hinges, rows)
        return features

    def _fit(self, X) -> np.ndarray:
        """Learn the statistics (a count of pixel values, not a pass over the features)."""
        self._validate_params()
        X = validate_data(self, X, dtype=ACCEPTED_DTYPES, order="C")
        if self.scaling == "minmax":
            self.mean_ = self.scale_ = None
        else:
            self.mean_, self.scale_ = feature_statistics(
                X, self.pixel_transform, self.power, self.hinges)
        return X

    def _features(self, X: np.ndarray) -> np.ndarray:
        if self.mean_ is None:
            return transform_pixels(X, self.pixel_transform, self.power, self.hinges)
        return standardised_features(X, self.pixel_transform, self.power, self.hinges,
                                     self.mean_, self.scale_)

    def __setstate__(self, state: dict) -> None:
        """Files written before `hinges` existed had none."""
        state.setdefault("hinges", 0)
        super().__setstate__(state)

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, reset=False, dtype=ACCEPTED_DTYPES, order="C")
        return self._features(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
