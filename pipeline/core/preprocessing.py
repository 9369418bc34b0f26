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
from collections.abc import Iterator

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


def fit_transform_standardised(
    X: np.ndarray, transform: str | None, power: float = 0.5, hinges: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transform X, learn per-feature mean and (floored) std, standardise: (features, mean, std).

    The statistics come from the same pass that transforms each chunk, as float64 sums of values
    shifted by the first row, which keeps E[d^2] - E[d]^2 accurate for features far from zero.
    (Not BLAS products with a ones vector: OpenBLAS threads make those slower here, not faster.)
    """
    _check_transform(transform)
    n_samples = X.shape[0]
    n_features = n_output_features(X.shape[1], hinges)
    transformed = np.empty((n_samples, n_features), dtype=np.float32)
    shift = None
    sums = np.zeros(n_features, dtype=np.float64)
    sums_of_squares = np.zeros(n_features, dtype=np.float64)
    for start, stop in row_chunks(n_samples):
        chunk = transformed[start:stop]
        _transform_chunk(X[start:stop], chunk, transform, power, hinges)
        if shift is None:
            shift = chunk[0].copy()
        deviations = chunk - shift
        sums += deviations.sum(axis=0, dtype=np.float64)
        deviations *= deviations
        sums_of_squares += deviations.sum(axis=0, dtype=np.float64)
    mean_deviation = sums / n_samples
    variance = np.maximum(sums_of_squares / n_samples - mean_deviation**2, 0.0)
    mean = (shift + mean_deviation).astype(np.float32)
    scale = np.maximum(np.sqrt(variance), STD_FLOOR).astype(np.float32)
    return standardise_inplace(transformed, mean, scale), mean, scale


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
        self._fit_transform(X)
        return self

    def fit_transform(self, X, y=None, **fit_params):
        return self._fit_transform(X)

    def _fit_transform(self, X) -> np.ndarray:
        self._validate_params()
        X = validate_data(self, X, dtype=ACCEPTED_DTYPES, order="C")
        if self.scaling == "minmax":
            self.mean_ = self.scale_ = None
            return transform_pixels(X, self.pixel_transform, self.power, self.hinges)
        features, self.mean_, self.scale_ = fit_transform_standardised(
            X, self.pixel_transform, self.power, self.hinges
        )
        return features

    def __setstate__(self, state: dict) -> None:
        """Files written before `hinges` existed had none."""
        state.setdefault("hinges", 0)
        super().__setstate__(state)

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, reset=False, dtype=ACCEPTED_DTYPES, order="C")
        features = transform_pixels(X, self.pixel_transform, self.power, self.hinges)
        if self.mean_ is None:
            return features
        return standardise_inplace(features, self.mean_, self.scale_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
