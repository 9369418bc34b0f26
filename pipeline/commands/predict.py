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
logged model saved any other way (pickle, cloudpickle) is refused from its MLmodel file, unread.

Output: one row per image (its file, with `[index]` for the images of an IDX or .npy file), the
most probable classes and their probabilities as an aligned table; with --json a JSON list, one
image per line: {"source": file, "index": position in the file (null for a PNG), "predictions":
[{"class", "label", "probability"}, ...]}. The model used is named on stderr.

Exit codes: 0 done; 1 an unreadable or invalid input or parameter file (every bad input is
named); 2 bad usage; 3 the model or the MLflow store cannot be found or loaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.core.files import MAX_ARRAY_FILE_BYTES, FileRefusedError, open_regular, read_bounded
from pipeline.core.idx import IMAGE_SHAPE, IdxFormatError, read_idx
from pipeline.core.labelled_images import read_png
from pipeline.support import config, models, registry_reader, store

EXIT_INPUT = 1
EXIT_MODEL = 3
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"


class InputError(ValueError):
    """An input file that cannot be classified; the message names the file."""


class ModelError(RuntimeError):
    """The model or its store cannot be found or used; the message says what to do."""


@dataclass(frozen=True)
class Batch:
    """The images of one input file, flattened to (n, 784) uint8 as the model expects."""

    source: str
    images: np.ndarray
    single: bool  # one image per file (PNG): shown without an index


# --- Inputs ---------------------------------------------------------------------------------


def _as_pixels(path: Path, array: np.ndarray) -> np.ndarray:
    """uint8 (n, 784) from an array of pixel values; InputError says which value is wrong."""
    flat_layout = array.ndim == 2 and array.shape[1] == N_PIXELS
    if not (flat_layout or array.ndim == 3 and array.shape[1:] == IMAGE_SHAPE):
        raise InputError(f"{path}: array of shape {array.shape}, expected (n, 784) or (n, 28, 28)")
    flat = array.reshape(len(array), N_PIXELS)
    if len(flat) == 0:
        raise InputError(f"{path}: the array holds no images")
    if flat.dtype == np.uint8:
        return flat
    kind = flat.dtype.kind
    if kind not in "iuf":  # bool, complex, strings, dates...
        raise InputError(f"{path}: dtype {flat.dtype} is not a pixel type; expected uint8, or "
                         "integer values 0..255 in an integer or float array")
    bad = (flat < 0) | (flat > 255)
    if kind == "f":
        bad |= ~np.isfinite(flat) | (flat != np.round(flat))
    if bad.any():
        image, pixel = np.argwhere(bad)[0]
        raise InputError(f"{path}: pixel values must be integers in 0..255 ({flat.dtype}); image "
                         f"{image} has {flat[image, pixel].item()!r} at pixel {pixel}")
    return flat.astype(np.uint8)


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
    return _as_pixels(path, array)


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


# --- The model ------------------------------------------------------------------------------


def check_store(uri: str) -> None:
    """A local store must exist: MLflow would create an empty one and report a missing model.

    A tracking server must answer, and accept the credentials, within seconds.
    """
    path = store.local_store_path(uri)
    if not store.is_local(uri):
        try:
            store.check_server(uri)
        except store.StoreUnavailable as exc:
            raise ModelError(str(exc)) from None
        return
    if path is None or not path.exists():
        where = path.absolute() if path is not None else "memory"
        raise ModelError(f"no MLflow store at {where} (tracking URI {uri}): train a model first "
                         "with `make train`, run from the project root, or set "
                         "MLFLOW_TRACKING_URI")
    try:
        store.check_integrity(uri)
    except store.StoreError as exc:
        raise ModelError(str(exc)) from None


def _registered_version(registry: registry_reader.Registry, uri: str,
                        tracking_uri: str) -> registry_reader.VersionRecord:
    """The registry entry a `models:/` URI names, or ModelError saying what is missing.

    Unsupported: a URI only MLflow resolves (a logged model id, `latest`, a stage).
    """
    parts = uri.removeprefix("models:/").split("/")  # read as MLflow's _parse_model_uri does
    if len(parts) == 2 and parts[1].isdigit():
        (name, version), alias = parts, None
    elif len(parts) == 1 and "@" in parts[0]:
        (name, alias), version = parts[0].rsplit("@", 1), None
        if alias.lower() == "latest":  # not an alias: MLflow's name for the newest version
            raise registry_reader.Unsupported(f"MLflow resolves {uri}")
    else:  # a logged model id, `latest`, a stage, or a URI MLflow will judge
        raise registry_reader.Unsupported(f"MLflow resolves {uri}")
    aliases = registry.aliases(name)
    if aliases is None:
        raise ModelError(f"no registered model {name!r} in {tracking_uri}: train and "
                         "register one with `make train`")
    if alias is not None:
        if alias not in aliases:
            if alias == store.CHAMPION:
                raise ModelError(f"no champion yet for {name!r} in {tracking_uri}: "
                                 "run `make train`")
            known = ", ".join(f"{a} -> version {v}" for a, v in sorted(aliases.items()))
            raise ModelError(f"{name!r} has no alias {alias!r} (aliases: {known or 'none'})")
        found = registry.version(name, aliases[alias])
        if found is None:  # an alias on a missing version: MLflow says what it makes of it
            raise registry_reader.Unsupported(f"{uri} points to no version")
        return found
    found = registry.version(name, version)
    if found is None:  # the versions are listed only to say which exist
        versions = registry.versions(name)
        raise ModelError(f"{name!r} has no version {version} "
                         f"(versions: {', '.join(map(str, versions)) or 'none'})")
    return found


@dataclass(frozen=True)
class ResolvedModel:
    """What `--model` names: the URI to load (a registry alias pinned to its version)."""

    requested: str
    uri: str
    description: str
    tracking_uri: str | None  # None for a local file or folder
    files: registry_reader.FileReader | None = None  # the version's files, read without MLflow

    def explain(self, message: str) -> str:
        """`message` about the loaded URI, saying which version an alias stood for."""
        if self.uri == self.requested:
            return message
        return f"{self.requested} is version {self.uri.rsplit('/', 1)[1]}: {message}"


def _pinned(registry: registry_reader.Registry, uri: str, tracking_uri: str) -> ResolvedModel:
    try:
        record = _registered_version(registry, uri, tracking_uri)
    except (ModelError, registry_reader.Unsupported):
        raise
    except Exception as exc:  # MLflow, SQLAlchemy and the network fail in many ways
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise ModelError(f"cannot resolve {uri} in {tracking_uri}: {message}") from None
    return ResolvedModel(uri, f"models:/{record.name}/{record.version}",
                         f"{uri} (version {record.version}, run {record.run_id})", tracking_uri,
                         record.read)


def resolve_model(uri: str, mlflow_cfg: config.MlflowConfig) -> ResolvedModel:
    """Pin `models:/NAME@alias` to its version, so what is checked is what gets loaded.

    The registry is read directly when it can be (`registry_reader`: no MLflow import, about
    2 s saved); any other store or URI goes through MLflow's client.
    """
    if urlsplit(uri).scheme not in ("models", "runs"):
        return ResolvedModel(uri, uri, uri, None)
    tracking_uri = store.tracking_uri(mlflow_cfg)
    check_store(tracking_uri)
    if uri.startswith("models:/"):
        try:
            return _pinned(registry_reader.open_registry(tracking_uri), uri, tracking_uri)
        except registry_reader.Unsupported:
            pass
        except registry_reader.RegistryError as exc:
            raise ModelError(f"cannot resolve {uri} in {tracking_uri}: {exc}") from None
    store.quiet_mlflow()
    models.import_skops()  # before MLflow imports it: skops's table of trusted types, kept once
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if not uri.startswith("models:/"):
        return ResolvedModel(uri, uri, uri, tracking_uri)
    try:
        return _pinned(registry_reader.ClientRegistry(), uri, tracking_uri)
    except registry_reader.Unsupported:
        return ResolvedModel(uri, uri, uri, tracking_uri)


def load_model(uri: str, mlflow_cfg: config.MlflowConfig) -> tuple[Any, str]:
    """The estimator `uri` names, and a description of it for the user.

    Logged models and MLflow model folders go through `models.load_model_uri`, which refuses
    anything but skops before loading a byte of it; `.skops` files through `models.load`.
    """
    resolved = resolve_model(uri, mlflow_cfg)
    return load_resolved(resolved), resolved.description


MODEL_FORMS = ("; --model takes models:/<name>@<alias>, models:/<name>/<version>, "
               "runs:/<run id>/model, an MLflow model folder or a .skops file")


def load_resolved(resolved: ResolvedModel) -> Any:
    """The estimator of a resolved `--model`; ModelError names it and the way out."""
    uri, path = resolved.requested, Path(resolved.uri)
    try:
        if resolved.files is not None:
            return models.load_model_files(resolved.files, resolved.uri)
        if resolved.tracking_uri is not None or (path / "MLmodel").is_file():
            return models.load_model_uri(resolved.uri, resolved.tracking_uri)
        if not path.exists():  # a path, or a URI mistyped: not a reason to retrain
            raise ModelError(f"{path} not found{MODEL_FORMS}")
        return models.load(path)
    except models.ModelFileError as exc:
        hint = "" if resolved.tracking_uri is not None or path.suffix == ".skops" else (
            MODEL_FORMS)
        raise ModelError(resolved.explain(f"{exc}{hint}")) from None
    except ModelError:
        raise
    except registry_reader.RegistryError as exc:
        raise ModelError(resolved.explain(f"cannot read the model: {exc}")) from None
    except Exception as exc:  # MLflow, SQLAlchemy and the network fail in many ways
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise ModelError(f"cannot load {uri} from {resolved.tracking_uri}: {message}") from None


def check_model(model: Any, class_names: Sequence[str]) -> np.ndarray:
    """The model's labels, after checking that it fits the images and the class names."""
    if not hasattr(model, "predict_proba") or not hasattr(model, "classes_"):
        raise ModelError(f"{type(model).__name__} has no predict_proba or classes_: not a "
                         "classifier this pipeline trained")
    labels = np.asarray(model.classes_)
    if (labels.dtype.kind not in "iu" or labels.min() < 0
            or labels.max() >= len(class_names)):
        raise ModelError(f"the model's labels {labels.tolist()} are not indices into the "
                         f"{len(class_names)} data.class_names of the parameter file")
    features = getattr(model, "n_features_in_", N_PIXELS)
    if features != N_PIXELS:
        raise ModelError(f"the model expects {features} features, not {N_PIXELS} pixels")
    return labels


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
        model, description = load_model(uri, cfg.mlflow)
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
