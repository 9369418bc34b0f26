"""From the `model` config group to a fitted estimator, and the model file format (skops).

The config keys are the estimator's own parameter names, so building a model is
`factory(**params)` and checking the values is the estimator's own parameter validation
(scikit-learn's `_parameter_constraints`): there is no second copy of the defaults or the rules.
Whatever the kind, `fit` returns a per-epoch history in the same shape.

A model is only ever rebuilt by skops with TRUSTED_TYPES: a `.skops` file with `load`, a logged
or registered model with `load_model_uri`, which reads the model's MLmodel file and refuses any
other format before a byte of the model itself is downloaded. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import re
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.support.config import ConfigError


class ModelFileError(ValueError):
    """The model file is missing or not a model this pipeline wrote (a stage reports it in one
    line, as every ValueError)."""


class UntrustedModelError(ModelFileError):
    """A logged model in a format that could run code when loaded (pickle, a custom pyfunc)."""


# Types skops must be allowed to rebuild beyond its own safe list: our classes only.
TRUSTED_TYPES = [
    "pipeline.core.estimator.SoftmaxRegression",
    "pipeline.core.preprocessing.PixelFeatures",
]


@dataclass(frozen=True)
class Kind:
    """A model the pipeline can train: its short name and how a run of it is named."""

    name: str
    run_name: Callable[[dict[str, Any]], str]


# `_target_` -> kind. Only these factories may be instantiated from a configuration.
KINDS: dict[str, Kind] = {
    "pipeline.core.estimator.SoftmaxRegression": Kind(
        "softmax", lambda p: f"softmax-{p['optimizer']}-lr{p['learning_rate']:g}"
                             f"-ep{p['epochs']}-bs{p['batch_size']}"),
    "pipeline.core.baseline.make_logistic_regression": Kind(
        "sklearn_logreg", lambda p: f"logreg-C{p['C']:g}-it{p['max_iter']}"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A checked `model` config: which factory, with which keyword arguments."""

    target: str
    params: dict[str, Any]

    @property
    def kind(self) -> str:
        return KINDS[self.target].name

    @property
    def run_name(self) -> str:
        """Readable in the MLflow UI's run list: what was trained, with its main knobs."""
        return KINDS[self.target].run_name(self.all_params)

    @property
    def all_params(self) -> dict[str, Any]:
        """The configured values over the factory's own defaults."""
        defaults = {name: p.default for name, p in _keyword_parameters(self.target).items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **self.params}


def _factory(target: str) -> Callable[..., Any]:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _keyword_parameters(target: str) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(_factory(target)).parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


_PARAMETER_NAME = re.compile(r"The '(\w+)' parameter of \w+ must be (.*?)\.? Got .*$", re.S)


def check_params(model: Any) -> ModelSpec:
    """The `model` node as a ModelSpec; ConfigError names the key, the value and what is allowed."""
    if isinstance(model, ModelSpec):
        return model
    if not isinstance(model, dict):
        raise ConfigError(f"model={model!r} is invalid: expected a mapping with a _target_ key")
    params = dict(model)
    target = params.pop("_target_", None)
    if target not in KINDS:
        choices = ", ".join(f"{kind.name} ({t})" for t, kind in KINDS.items())
        raise ConfigError(f"model._target_={target!r} is invalid: expected one of: {choices}; "
                          "choose a config group with `model=softmax` or `model=sklearn_logreg`")
    allowed = _keyword_parameters(target)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a parameter of {target}; allowed keys: "
                          f"{', '.join(allowed)}")
    missing = [name for name, p in allowed.items()
               if p.default is inspect.Parameter.empty and name not in params]
    if missing:
        raise ConfigError(f"model.{missing[0]} is missing: {target} needs "
                          f"{', '.join(missing)}")
    spec = ModelSpec(target, params)
    _check_values(_factory(target)(**params), params)
    return spec


# scikit-learn prints a set of allowed strings in hash order, which changes between runs.
_STRING_SET = re.compile(r"\{('[^']*'(?:, '[^']*')*)\}")


def _sorted_set(match: re.Match) -> str:
    return "{" + ", ".join(sorted(match.group(1).split(", "))) + "}"


def _check_values(estimator: Any, params: dict[str, Any]) -> None:
    """Run each scikit-learn estimator's own parameter validation, before any data is read."""
    from sklearn.utils._param_validation import InvalidParameterError

    for step in getattr(estimator, "named_steps", {}).values() or [estimator]:
        try:
            step._validate_params()
        except InvalidParameterError as exc:
            match = _PARAMETER_NAME.match(str(exc))
            if match is None:
                raise ConfigError(f"model: {exc}") from None
            name, expected = match.groups()
            expected = _STRING_SET.sub(_sorted_set, expected)
            raise ConfigError(f"model.{name}={params.get(name, getattr(step, name))!r} is "
                              f"invalid: expected {expected}") from None


def build(model: ModelSpec | dict[str, Any]) -> Any:
    """An unfitted estimator: the factory called with the configured keyword arguments."""
    spec = model if isinstance(model, ModelSpec) else check_params(model)
    return _factory(spec.target)(**spec.params)


def fit(estimator: Any, X, y, X_val, y_val,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train and return the history, one record per epoch, whatever the kind of model.

    Estimators that train by epochs (SoftmaxRegression) report each one through `on_epoch` and
    keep their own `history_`; the others (lbfgs) give one record measured after the fit.
    """
    if "callback" in inspect.signature(estimator.fit).parameters:
        estimator.fit(X, y, eval_set=(X_val, y_val), callback=on_epoch)
        return [dict(row) for row in estimator.history_]
    from pipeline.core.softmax import cross_entropy

    started = time.perf_counter()
    estimator.fit(X, y)
    record: dict[str, Any] = {"epoch": int(max(_n_iter(estimator)))}
    for split, (features, labels) in {"train": (X, y), "val": (X_val, y_val)}.items():
        log_proba = estimator.predict_log_proba(features)
        record[f"{split}_loss"] = cross_entropy(log_proba, labels)
        record[f"{split}_accuracy"] = float((log_proba.argmax(axis=1) == labels).mean())
    record["lr"] = None
    if on_epoch is not None:
        on_epoch({**record, "seconds": time.perf_counter() - started})
    return [record]


def _n_iter(estimator: Any) -> list[int]:
    final = estimator[-1] if hasattr(estimator, "steps") else estimator
    return [int(n) for n in getattr(final, "n_iter_", [1])]


def best_epoch(estimator: Any, history: list[dict[str, Any]]) -> int:
    """The epoch whose weights the model holds (early stopping may restore an earlier one)."""
    return int(getattr(estimator, "best_epoch_", history[-1]["epoch"]))


# skops's table of the types it trusts by default (a copy is kept, see import_skops).
_TRUSTED_TYPES_MODULE = "skops.io._trusted_types"
_TABLE_PACKAGES = ("skops", "scikit-learn", "numpy", "scipy")


def _trusted_types_cache() -> tuple[Path, str]:
    from importlib.metadata import version

    key = " ".join([sys.version.split()[0], *(f"{p}=={version(p)}" for p in _TABLE_PACKAGES)])
    return Path(sys.prefix) / "skops-trusted-types.json", key


def import_skops() -> types.ModuleType:
    """`skops.io`, without rebuilding its table of default-trusted types in every process.

    Importing skops.io builds that table by importing every scikit-learn estimator and scanning
    numpy and scipy: about a second, in each stage and each `predict`. The table only changes
    with the installed packages, so the first import in an environment keeps skops's own table
    next to the interpreter (in `sys.prefix`, as trusted as the packages themselves), keyed by
    the Python and package versions, and later imports hand it to skops. It grants nothing that
    skops would not: a table of another version, or none, means the normal import.
    """
    if "skops.io" in sys.modules:
        return sys.modules["skops.io"]
    from pipeline.core.files import atomic_write_text

    path, key = _trusted_types_cache()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if cached.get("key") == key and isinstance(cached.get("names"), dict):
        table = types.ModuleType(_TRUSTED_TYPES_MODULE)
        vars(table).update(cached["names"])
        sys.modules[_TRUSTED_TYPES_MODULE] = table
        try:
            import skops.io
            return skops.io
        except ImportError:  # skops wants a name the copy lacks: forget it, import normally
            for name in [name for name in sys.modules if name.startswith("skops.io")]:
                del sys.modules[name]
    import skops.io

    names = {name: value for name, value in vars(sys.modules[_TRUSTED_TYPES_MODULE]).items()
             if name.isupper() and isinstance(value, list)
             and all(isinstance(item, str) for item in value)}
    with contextlib.suppress(OSError):  # read-only: every process scans, as without a copy
        atomic_write_text(path, json.dumps({"key": key, "names": names}, indent=1) + "\n")
    return skops.io


def save(estimator, path: str | Path) -> None:
    """Write atomically with skops: loading it later runs no arbitrary code.

    The archive is made reproducible first (`reproducible_skops`): the same model gives the same
    bytes, so DVC caches it once and `dvc.lock` shows whether a retrain reproduced it.
    """
    from pipeline.core.files import atomic_write_bytes

    atomic_write_bytes(path, reproducible_skops(import_skops().dumps(estimator)))


def reproducible_skops(archive: bytes) -> bytes:
    """The same skops archive with nothing that depends on the process or the clock.

    skops names each object by its memory address (`__id__`, and the `<id>.npy` file of each
    array) and stamps every zip entry with the current time. Here the ids become 1, 2, ... in the
    order they first appear in `schema.json` (the same object keeps one number, so shared
    references still load as one object), files are renamed to match, entries are sorted and
    stored uncompressed with a fixed date and mode. `skops.io.load` reads it as before.
    """
    import io
    import zipfile

    from pipeline.core.files import fixed_zip_info

    with zipfile.ZipFile(io.BytesIO(archive)) as source:
        schema = json.loads(source.read("schema.json"))
        ids: dict[int, int] = {}
        files: dict[str, str] = {}

        def renumber(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "__id__" and isinstance(value, int):
                        node[key] = ids.setdefault(value, len(ids) + 1)
                    elif key == "file" and isinstance(value, str):
                        suffix = Path(value).suffix
                        node[key] = files.setdefault(value, f"{len(files) + 1}{suffix}")
                    else:
                        renumber(value)
            elif isinstance(node, list):
                for value in node:
                    renumber(value)

        renumber(schema)
        entries = {new: source.read(old) for old, new in files.items()}
    entries["schema.json"] = json.dumps(schema, indent=2).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as target:
        for name in sorted(entries):
            target.writestr(fixed_zip_info(name), entries[name])
    return buffer.getvalue()


def _rebuild(source: Path | bytes, name: str):
    """skops.io.load(s) with TRUSTED_TYPES; ModelFileError names `name` and what is wrong."""
    skops_io = import_skops()
    given = {"data": source} if isinstance(source, bytes) else {"file": source}
    try:
        untrusted = set(skops_io.get_untrusted_types(**given))
        unexpected = untrusted - set(TRUSTED_TYPES)
        if unexpected:
            raise UntrustedModelError(
                f"{name} contains types this pipeline does not trust: {sorted(unexpected)}")
        if isinstance(source, bytes):
            return skops_io.loads(source, trusted=sorted(untrusted))
        return skops_io.load(source, trusted=sorted(untrusted))
    except ModelFileError:
        raise
    except Exception as exc:  # a truncated or foreign file fails in many ways inside skops
        raise ModelFileError(f"{name} is not a readable skops model file "
                             f"({type(exc).__name__}: {exc})") from None


def load(path: str | Path):
    """A model file written by `save`; only skops's safe types and TRUSTED_TYPES are rebuilt.

    A missing, truncated or foreign file is a ModelFileError naming it and the way back.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} not found: run the train stage first (`dvc repro train`)")
    try:
        return _rebuild(path, str(path))
    except UntrustedModelError:
        raise
    except ModelFileError as exc:
        raise ModelFileError(f"{exc}; restore it with `dvc checkout --force {path}` or retrain "
                             "with `dvc repro -f train`") from None


# The pyfunc loaders a model may declare: MLflow's scikit-learn loader and this pipeline's serving
# loader (pipeline/support/serving.py); both read the same skops file with the TRUSTED_TYPES.
TRUSTED_PYFUNC_LOADERS = ("mlflow.sklearn", "pipeline.support.serving")


def trusted_model_file(uri: str, flavors: dict[str, Any]) -> str:
    """The skops file of a logged model, once its MLmodel says nothing else can be loaded.

    UntrustedModelError names the URI and the format found: pickle, cloudpickle, another flavor
    or a pyfunc loader other than MLflow's scikit-learn one, or trusted types beyond ours.
    """
    sklearn = flavors.get("sklearn")
    if not isinstance(sklearn, dict):
        found = ", ".join(sorted(flavors)) or "none"
        raise UntrustedModelError(f"{uri} is not a scikit-learn model saved with skops (flavors: "
                                  f"{found}); this pipeline loads nothing else")
    found_format = sklearn.get("serialization_format")
    if found_format != "skops":
        raise UntrustedModelError(
            f"{uri} is saved as {found_format!r}, not 'skops': loading it could run arbitrary "
            "code, so it is refused; log models with serialization_format='skops'")
    extra_types = set(sklearn.get("skops_trusted_types") or ()) - set(TRUSTED_TYPES)
    if extra_types:
        raise UntrustedModelError(f"{uri} asks to trust types this pipeline does not trust: "
                                  f"{sorted(extra_types)}")
    pyfunc = flavors.get("python_function")
    if isinstance(pyfunc, dict) and pyfunc.get("loader_module") not in TRUSTED_PYFUNC_LOADERS:
        raise UntrustedModelError(
            f"{uri} is served through the pyfunc loader {pyfunc.get('loader_module')!r}, not "
            f"{' or '.join(TRUSTED_PYFUNC_LOADERS)}: refused")
    name = sklearn.get("pickled_model")
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(
            name).parts:
        raise UntrustedModelError(f"{uri} names no usable model file ({name!r})")
    return name


def check_model_uri(uri: str, tracking_uri: str | None = None) -> str:
    """Read only the MLmodel file of `uri` and return its skops file's name, else refuse."""
    from pipeline.support.store import quiet_mlflow

    quiet_mlflow()
    import mlflow
    from mlflow.models import Model

    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    return trusted_model_file(uri, Model.load(uri).flavors)


def load_model_uri(uri: str, tracking_uri: str | None = None):
    """A logged or registered model (`models:/`, `runs:/`, a local MLflow model folder).

    The MLmodel file is checked first (`check_model_uri`); then only the skops file is fetched
    and rebuilt by `load`. MLflow's own loaders are never called.
    """
    import tempfile

    import mlflow.artifacts

    name = check_model_uri(uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{name}",
                                                    dst_path=tmp)
        return _rebuild(Path(local), f"{uri} ({name})")


# Caps on what a model version's files may weigh: MLmodel is a page of YAML, the default model's
# skops file about 100 KB.
MAX_MLMODEL_BYTES = 1 << 20
MAX_MODEL_BYTES = 512 << 20


def load_model_files(read: Callable[[str, int], bytes], uri: str):
    """A logged model from its files, read by `read(name, max_bytes)` (see registry_reader).

    The same checks as `load_model_uri` without MLflow: the MLmodel file first (parsed as plain
    YAML data), then only the skops file it names, rebuilt with the TRUSTED_TYPES.
    """
    import yaml

    try:
        meta = yaml.safe_load(read("MLmodel", MAX_MLMODEL_BYTES))
    except yaml.YAMLError as exc:
        raise ModelFileError(f"{uri}: its MLmodel file is not YAML ({exc})") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict):
        raise ModelFileError(f"{uri}: its MLmodel file declares no flavors")
    name = trusted_model_file(uri, flavors)
    return _rebuild(read(name, MAX_MODEL_BYTES), f"{uri} ({name})")


def pip_requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference starts a subprocess and costs seconds per model."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}"
            for package in ("mlflow", "scikit-learn", "skops", "numpy", "threadpoolctl")]

