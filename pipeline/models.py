"""From a `model` config group to an estimator, and the model file format (skops, never pickle)."""

from __future__ import annotations

from pathlib import Path

from pipeline import config


class ModelFileError(RuntimeError):
    """The model file is missing or not a model this pipeline wrote."""


# Types skops must be allowed to rebuild beyond its own safe list: our classes only.
TRUSTED_TYPES = [
    "pipeline.core.estimator.SoftmaxRegression",
    "pipeline.core.preprocessing.PixelFeatures",
]


def build(model: config.SoftmaxConfig | config.LogRegConfig):
    """An unfitted scikit-learn estimator for the configured model."""
    if isinstance(model, config.SoftmaxConfig):
        from pipeline.core.estimator import SoftmaxRegression

        return SoftmaxRegression(
            optimizer=model.optimizer,
            learning_rate=model.lr,
            momentum=model.momentum,
            nesterov=model.nesterov,
            batch_size=model.batch_size,
            epochs=model.epochs,
            lr_schedule=model.lr_schedule,
            l2=model.l2,
            scaling=model.scaling,
            pixel_transform=model.pixel_transform,
            power=model.power,
            early_stopping=model.early_stopping,
            patience=model.patience,
            random_state=model.seed,
        )
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from pipeline.core.preprocessing import PixelFeatures

    return Pipeline([
        ("features", PixelFeatures(pixel_transform=model.pixel_transform, power=model.power,
                                   scaling=model.scaling)),
        ("logreg", LogisticRegression(C=model.C, max_iter=model.max_iter, tol=model.tol)),
    ])


def save(estimator, path: str | Path) -> None:
    """Write atomically with skops: loading it later runs no arbitrary code."""
    import skops.io

    from pipeline.core.files import atomic_write_bytes

    atomic_write_bytes(path, skops.io.dumps(estimator))


def load(path: str | Path):
    import skops.io

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} not found: run the train stage first (`dvc repro train`)")
    try:
        untrusted = set(skops.io.get_untrusted_types(file=path))
        unexpected = untrusted - set(TRUSTED_TYPES)
        if unexpected:
            raise ModelFileError(
                f"{path} contains types this pipeline does not trust: {sorted(unexpected)}")
        return skops.io.load(path, trusted=sorted(untrusted))
    except ModelFileError:
        raise
    except Exception as exc:  # a truncated or foreign file fails in many ways inside skops
        raise ModelFileError(f"{path} is not a readable skops model file: {exc}") from None
