"""Classify images with a trained model: the champion by default, or any version, run or file.

Usage: python -m pipeline.predict INPUT... [--model URI] [--top-k K] [--json]
                                  [--params params.yaml]
(`pipeline.predict` calls this module, `pipeline.commands.predict`.)

INPUT, any number and mix of:
- a PNG file: one 28x28 8-bit grayscale image, checked with the rules of the extra images;
- an IDX image file, gzipped or not, like the Fashion-MNIST archives (`t10k-images-idx3-ubyte.gz`);
- a NumPy `.npy` array of shape (n, 784) or (n, 28, 28): uint8, or any integer or float dtype
  whose values are integers in 0..255.

--model: `models:/<name>@<alias>` (default: `models:/<mlflow.registered_model>@champion`),
`models:/<name>/<version>`, `runs:/<run id>/model`, an MLflow model folder, or the path of a
`.skops` file such as `models/model.skops`. The MLflow store is $MLFLOW_TRACKING_URI, else
`mlflow.tracking_uri` of the parameter file: the stages' rule. Predicting never writes to the
store. A registered model (`models:/NAME@alias`, `models:/NAME/N`) in the sqlite store or on a
tracking server that proxies its artifacts is read without importing MLflow (about 2 s saved,
see `pipeline.support.registry_reader`); `runs:/` URIs, model folders and other stores go
through MLflow's client. Only skops models with the pipeline's trusted types are loaded: a
logged model saved any other way (pickle, cloudpickle) is refused from its MLmodel file, unread
(`pipeline.support.model_loader`). The inputs are read by `pipeline.core.images`.

Output: one row per image (its file, with `[index]` for the images of an IDX or .npy file), the
most probable classes and their probabilities as an aligned table; with --json a JSON list, one
image per line: {"source": file, "index": position in the file (null for a PNG), "predictions":
[{"class", "label", "probability"}, ...]}. The model used is named on stderr.

Class names: a logged model carries the names it was trained with (the `class_names` of its
pyfunc flavor in MLmodel) and those are used; a `data.class_names` in the parameter file that
differs is reported on stderr and ignored. A bare `.skops` file holds no names (the estimator
knows only label indices), so the parameter file's `data.class_names` name its labels.

Exit codes: 0 done; 1 an unreadable or invalid input or parameter file (every bad input is
named); 2 bad usage; 3 the model or the MLflow store cannot be found or loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.images import Batch, InputError, read_inputs
from pipeline.support import config, store
from pipeline.support.model_loader import (
    EXIT_MODEL,
    ModelError,
    check_model,
    load_named_model,
)

EXIT_INPUT = 1


# --- Predictions and their display ----------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    file: str
    index: int | None  # position in an IDX or .npy file; None for a PNG
    ranked: list[tuple[int, float]]  # (label, probability), most probable first

    @property
    def source(self) -> str:
        return self.file if self.index is None else f"{self.file}[{self.index}]"

    def record(self, class_names: Sequence[str]) -> dict[str, Any]:
        return {"source": self.file, "index": self.index, "predictions": [
            {"class": class_names[label], "label": label, "probability": probability}
            for label, probability in self.ranked]}


def predict(model: Any, labels: np.ndarray, batches: Sequence[Batch],
            top_k: int) -> list[Prediction]:
    """Top-k per image; the first is `predict_proba(X).argmax(1)`, as in the evaluate stage."""
    proba = model.predict_proba(np.concatenate([batch.images for batch in batches]))
    order = np.argsort(-proba, axis=1, kind="stable")[:, :top_k]
    results, row = [], 0
    for batch in batches:
        for index in range(len(batch.images)):
            ranked = [(int(labels[column]), float(proba[row, column])) for column in order[row]]
            results.append(Prediction(batch.source, None if batch.single else index, ranked))
            row += 1
    return results


def format_json(predictions: Sequence[Prediction], class_names: Sequence[str]) -> str:
    """A JSON list with one image per line: valid JSON that grep and head still handle."""
    lines = [json.dumps(p.record(class_names)) for p in predictions]
    return "[\n" + ",\n".join(lines) + "\n]"


def format_table(predictions: Sequence[Prediction], class_names: Sequence[str]) -> str:
    """Aligned columns; with top-k, `Shirt 0.6100, T-shirt/top 0.2200, ...` aligned by rank."""
    sources = [p.source for p in predictions]
    width = max(len("source"), *map(len, sources))
    top_k = len(predictions[0].ranked)
    names = [[class_names[label] for label, _ in p.ranked] for p in predictions]
    if top_k == 1:
        name_width = max(len("class"), *(len(n[0]) for n in names))
        lines = [f"{'source':<{width}}  {'class':<{name_width}}  probability"]
        lines += [f"{p.source:<{width}}  {n[0]:<{name_width}}  {p.ranked[0][1]:>11.4f}"
                  for p, n in zip(predictions, names, strict=True)]
        return "\n".join(lines)
    widths = [max(len(n[rank]) for n in names) for rank in range(top_k)]
    lines = [f"{'source':<{width}}  top {top_k} classes with their probabilities"]
    for p, n in zip(predictions, names, strict=True):
        cells = [f"{n[rank]:<{widths[rank]}} {p.ranked[rank][1]:.4f}" for rank in range(top_k)]
        lines.append(f"{p.source:<{width}}  " + ", ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Classify Fashion-MNIST images (PNG, IDX or .npy files) with a trained model.",
        epilog="Exit codes: 0 done, 1 invalid input or parameter file, 2 bad usage, "
               f"{EXIT_MODEL} model or MLflow store not found or not loadable.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="PNG (28x28 grayscale), IDX image file (.gz or raw) or .npy array")
    parser.add_argument("--model", default=None,
                        help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/model "
                             "or a .skops file (default: models:/<registered model>@champion)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K",
                        help="show the K most probable classes (default: 1)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    parser.add_argument("--params", default=config.PARAMS_FILE,
                        help="composed parameter file, for the class names and the MLflow store")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
    except config.ConfigError as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    class_names = list(cfg.data.class_names)
    if not 1 <= args.top_k <= len(class_names):
        parser.error(f"--top-k must be between 1 and {len(class_names)}")
    try:
        batches = read_inputs(args.inputs)
    except InputError as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    uri = args.model or store.model_uri(cfg.mlflow)
    try:
        model, model_names, description = load_named_model(uri, cfg.mlflow)
        if model_names is not None:
            if model_names != class_names:
                print(f"predict: warning: data.class_names in {args.params} differ from the "
                      f"names {description} was trained with; using the model's: "
                      f"{', '.join(model_names)}", file=sys.stderr)
            class_names = model_names
        labels = check_model(model, class_names)
    except ModelError as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    predictions = predict(model, labels, batches, args.top_k)
    print(f"predict: {len(predictions)} image{'s' if len(predictions) != 1 else ''}, "
          f"model {description}", file=sys.stderr)
    text = (format_json if args.json else format_table)(predictions, class_names)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
