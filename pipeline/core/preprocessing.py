"""The fixed pixel transform and the standardisation that SoftmaxRegression builds in.

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
    "pixel_transform": [StrOptions({"power", "sqrt"}), None],
    "power": [Interval(numbers.Real, 0, math.inf, closed="neither")],
    "scaling": [StrOptions(set(SCALINGS))],
}


def row_chunks(n_rows: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, int]]:
    for start in range(0, n_rows, chunk_rows):
        yield start, min(start + chunk_rows, n_rows)


def _transform_inplace(values: np.ndarray, transform: str | None, power: float) -> np.ndarray:
    """x/255, then a signed power: negative inputs (not pixels, but legal) stay finite."""
    values *= np.float32(1.0 / PIXEL_MAX)
    if transform is None:
        return values
    negative = np.signbit(values)
    np.abs(values, out=values)
    if transform == "sqrt":
        np.sqrt(values, out=values)
    else:
        np.power(values, np.float32(power), out=values)
    np.negative(values, out=values, where=negative)
    return values


def _transform_chunk(X: np.ndarray, out: np.ndarray, transform: str | None, power: float) -> None:
    if X.dtype == np.uint8:
        # A 256-entry lookup table: one gather instead of a division and a power per pixel, and
        # bit-identical to transforming the same values given as floats.
        table = _transform_inplace(np.arange(256, dtype=np.float32), transform, power)
        np.take(table, X.astype(np.intp), out=out, mode="clip")
    else:
        out[...] = X
        _transform_inplace(out, transform, power)


def transform_pixels(X: np.ndarray, transform: str | None, power: float = 0.5) -> np.ndarray:
    """The fixed elementwise transform of x/255 (none, sqrt or |.|**power) as new float32 array."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    transformed = np.empty(X.shape, dtype=np.float32)
    for start, stop in row_chunks(X.shape[0]):
        _transform_chunk(X[start:stop], transformed[start:stop], transform, power)
    return transformed


def fit_transform_standardised(
    X: np.ndarray, transform: str | None, power: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transform X, learn per-feature mean and (floored) std, standardise: (features, mean, std).

    The statistics come from the same pass that transforms each chunk, as float64 sums of values
    shifted by the first row, which keeps E[d^2] - E[d]^2 accurate for features far from zero.
    (Not BLAS products with a ones vector: OpenBLAS threads make those slower here, not faster.)
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    n_samples, n_features = X.shape
    transformed = np.empty(X.shape, dtype=np.float32)
    shift = None
    sums = np.zeros(n_features, dtype=np.float64)
    sums_of_squares = np.zeros(n_features, dtype=np.float64)
    for start, stop in row_chunks(n_samples):
        chunk = transformed[start:stop]
        _transform_chunk(X[start:stop], chunk, transform, power)
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
    """SoftmaxRegression's preprocessing as a transformer: pixel transform, then scaling.

    Parameters and defaults mirror SoftmaxRegression's `pixel_transform`, `power` and `scaling`.
    Output is float32. Fitted attributes are numpy arrays only, so skops can save it.
    """

    _parameter_constraints: dict = PIXEL_PARAMETER_CONSTRAINTS

    def __init__(
        self, *, pixel_transform: str | None = "power", power: float = 0.3,
        scaling: str = "standard",
    ):
        self.pixel_transform = pixel_transform
        self.power = power
        self.scaling = scaling

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
            return transform_pixels(X, self.pixel_transform, self.power)
        features, self.mean_, self.scale_ = fit_transform_standardised(
            X, self.pixel_transform, self.power
        )
        return features

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, reset=False, dtype=ACCEPTED_DTYPES, order="C")
        features = transform_pixels(X, self.pixel_transform, self.power)
        if self.mean_ is None:
            return features
        return standardise_inplace(features, self.mean_, self.scale_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
