"""The baseline: scikit-learn's LogisticRegression (lbfgs) fed exactly our model's features."""

from __future__ import annotations

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from pipeline.core.preprocessing import PixelFeatures


def make_logistic_regression(
    *, C: float, max_iter: int, tol: float, pixel_transform: str | None, power: float,
    hinges: int, scaling: str,
) -> Pipeline:
    """PixelFeatures then LogisticRegression; keyword names are those of the two steps.

    No defaults: the values live in `conf/model/sklearn_logreg.yaml`, the one place they are set.
    """
    return Pipeline([
        ("features", PixelFeatures(pixel_transform=pixel_transform, power=power,
                                   hinges=hinges, scaling=scaling)),
        ("logreg", LogisticRegression(C=C, max_iter=max_iter, tol=tol)),
    ])
