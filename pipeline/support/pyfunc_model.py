"""The served model: each image's class index, class name and probability, and the top k on request.

The model is logged with two flavors over one skops file: `sklearn` (`mlflow.sklearn.load_model`,
with `predict_proba`) and `python_function`, whose loader is `pipeline.support.model_loader`, so
`mlflow models serve` and `mlflow.pyfunc.load_model` answer with names and probabilities. The
wrapper is code, not a pickled object: the loader reads the skops file with the pipeline's
trusted types, and the class names are plain values in the MLmodel file. Pixels are checked by
`pipeline.core.images`, the rule `predict` follows too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.idx import IMAGE_SHAPE, N_PIXELS
from pipeline.core.images import PixelError, json_pixels

FLAVOR = "python_function"
# What MLflow imports to load a model this pipeline logged (its `_load_pyfunc`). Versions logged
# before it moved name `pipeline.support.serving`, kept as a shim that loads them the same way.
LOADER_MODULE = "pipeline.support.model_loader"
STORED_LOADER_MODULES = (LOADER_MODULE, "pipeline.support.serving")
TOP_K_MAX = 10
INPUT_CONTRACT = ("integers 0-255 (no floats, booleans or strings), shape (n, 784) or (n, 28, 28); "
                  "params.top_k (1-10) adds the k most probable classes")


def signature() -> Any:
    """Input, named outputs and the `top_k` parameter, for `/invocations` and the MLflow UI."""
    from mlflow.models import ModelSignature
    from mlflow.types import schema as types

    Array, ColSpec, DataType = types.Array, types.ColSpec, types.DataType

    outputs = [ColSpec(DataType.long, "class"), ColSpec(DataType.string, "class_name"),
               ColSpec(DataType.double, "probability"),
               ColSpec(Array(DataType.long), "top_classes", required=False),
               ColSpec(Array(DataType.string), "top_class_names", required=False),
               ColSpec(Array(DataType.double), "top_probabilities", required=False)]
    return ModelSignature(
        inputs=types.Schema([types.TensorSpec(np.dtype(np.uint8), (-1, N_PIXELS))]),
        outputs=types.Schema(outputs),
        params=types.ParamSchema([types.ParamSpec("top_k", DataType.long, 1)]))


def check_top_k(params: dict[str, Any] | None) -> int:
    top_k = (params or {}).get("top_k", 1)
    if type(top_k) is not int or not 1 <= top_k <= TOP_K_MAX:
        raise PixelError(f"params.top_k={top_k!r}: expected an integer 1-{TOP_K_MAX}")
    return top_k


class ServedModel:
    """The pyfunc implementation: predict_proba, ranked, with the class names."""

    def __init__(self, estimator: Any, class_names: Sequence[str]) -> None:
        self.estimator = estimator
        self.class_names = list(class_names)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        top_k = check_top_k(params)
        images = np.asarray(model_input)
        if images.dtype != np.uint8:
            images = json_pixels(images.tolist(), may_hold_booleans=images.dtype == bool)
        elif images.ndim == 3 and images.shape[1:] == IMAGE_SHAPE:
            images = images.reshape(len(images), N_PIXELS)
        proba = self.estimator.predict_proba(images)
        labels = np.asarray(self.estimator.classes_)
        order = np.argsort(-proba, axis=1, kind="stable")[:, :top_k]
        ranked = labels[order]
        rows = np.arange(len(proba))[:, None]
        answer = pd.DataFrame({
            "class": ranked[:, 0].astype(np.int64),
            "class_name": [self.class_names[label] for label in ranked[:, 0]],
            "probability": proba[rows[:, 0], order[:, 0]].astype(np.float64),
        })
        if top_k > 1:
            top_proba = proba[rows, order].astype(np.float64)
            answer["top_classes"] = [row.tolist() for row in ranked]
            answer["top_class_names"] = [[self.class_names[label] for label in row]
                                         for row in ranked]
            answer["top_probabilities"] = [row.tolist() for row in top_proba]
        return answer


def save_model(sk_model: Any, path: str, mlflow_model: Any, class_names: Sequence[str],
               **sklearn_options: Any) -> None:
    """The `sklearn` flavor as MLflow writes it (skops), with LOADER_MODULE as the pyfunc loader."""
    import mlflow.sklearn

    mlflow.sklearn.save_model(sk_model, path, mlflow_model=mlflow_model,
                              serialization_format="skops", **sklearn_options)
    flavor = mlflow_model.flavors[FLAVOR]
    flavor.update(loader_module=LOADER_MODULE, class_names=list(class_names),
                  input_contract=INPUT_CONTRACT)
    flavor.pop("predict_fn", None)
    mlflow_model.save(str(Path(path) / "MLmodel"))


def log_model(estimator: Any, class_names: Sequence[str], **options: Any) -> Any:
    """Log the estimator in the active run; returns MLflow's ModelInfo."""
    from mlflow.models import Model

    from pipeline.support.model_files import TRUSTED_TYPES

    return Model.log(artifact_path=None, name="model", flavor=sys.modules[__name__],
                     sk_model=estimator, class_names=class_names,
                     skops_trusted_types=TRUSTED_TYPES, signature=signature(), **options)
