"""The one door to a model: resolve what names it, check it, load it. Nothing is unpickled.

Whatever names the model, a `.skops` file, a `models:/` or `runs:/` URI, an MLflow model folder
or the files the registry reader found, it is rebuilt here by skops with the pipeline's
TRUSTED_TYPES, and a logged model's MLmodel file is read first: any other format (pickle,
cloudpickle, a foreign pyfunc loader) is refused before a byte of the model is downloaded.
`predict`, `serve`, the evaluate stage and MLflow's pyfunc loader (`_load_pyfunc`: this module
is the `loader_module` of every model the pipeline logs) all come through here; no other module
calls skops' or MLflow's model loaders (tests/test_model_loading_rule.py).

`resolve_model` pins `models:/NAME@alias` to its version, reading the registry directly when it
can (`registry_reader`: no MLflow import, about 2 s saved) and through MLflow's client otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.idx import N_PIXELS
from pipeline.support import config, model_integrity, registry_reader, store
from pipeline.support.model_files import TRUSTED_TYPES, import_skops
from pipeline.support.pyfunc_model import (
    FLAVOR,
    LOADER_MODULE,
    STORED_LOADER_MODULES,
    ServedModel,
)

EXIT_MODEL = 3  # the exit code of `predict` and `serve` when the model or its store fails

# The pyfunc loaders a model may declare: MLflow's scikit-learn loader and this pipeline's (this
# module, or `pipeline.support.serving` in versions logged before); all read the same skops file
# with the TRUSTED_TYPES.
TRUSTED_PYFUNC_LOADERS = ("mlflow.sklearn", *STORED_LOADER_MODULES)


class ModelFileError(PipelineError, ValueError):
    """The model file is missing or not a model this pipeline wrote (a stage reports it in one
    line, as every ValueError)."""


class UntrustedModelError(ModelFileError):
    """A logged model in a format that could run code when loaded (pickle, a custom pyfunc)."""


class ModelError(PipelineError, RuntimeError):
    """The model or its store cannot be found or used; the message says what to do."""


class ServeError(PipelineError, RuntimeError):
    """The model cannot be served: the message names it and says what to do."""


class ModelIntegrityError(ModelError):
    """A registered version's model file is not the one registered (`model_integrity`)."""


# --- Integrity: the bytes about to be loaded are the ones registered ---------------------------

BytesCheck = Callable[[bytes], None]


def verify_bytes(data: bytes, expected: str | None, what: str) -> str:
    """The digest of `data` (`model_integrity.model_digest`); ModelIntegrityError, naming `what`
    and both hashes, if it is not `expected`. None (a version registered before digests were
    recorded): a one-line notice on stderr, and the model is accepted."""
    actual = model_integrity.model_digest(data)
    if expected is None:
        print(model_integrity.unverified_notice(what, actual), file=sys.stderr)
    elif actual != expected:
        raise ModelIntegrityError(model_integrity.mismatch_message(what, expected, actual))
    return actual


def integrity_check(resolved: ResolvedModel) -> BytesCheck | None:
    """What the bytes of a registered version must hash to; None for anything else (a file, a
    run's model): only the registry records a digest."""
    if not resolved.registered:
        return None
    return lambda data: verify_bytes(data, resolved.expected_sha256, resolved.description)


# --- Model files (skops) ----------------------------------------------------------------------


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
    """A file written by `model_files.save`; only skops's safe types and TRUSTED_TYPES are rebuilt.

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


# --- Logged models: the MLmodel file first ---------------------------------------------------


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
    store.quiet_mlflow()
    import mlflow
    from mlflow.models import Model

    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    return trusted_model_file(uri, Model.load(uri).flavors)


def logged_class_names(uri: str, flavors: dict[str, Any]) -> list[str] | None:
    """The class names the model was logged with (its pyfunc flavor), None if it has none."""
    pyfunc = flavors.get(FLAVOR)
    names = pyfunc.get("class_names") if isinstance(pyfunc, dict) else None
    if names is None:
        return None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ModelFileError(f"{uri}: the class_names of its MLmodel file are not a list of "
                             "names")
    return names


def load_model_uri(uri: str, tracking_uri: str | None = None):
    """A logged or registered model (`models:/`, `runs:/`, a local MLflow model folder).

    The MLmodel file is checked first (`check_model_uri`); then only the skops file is fetched
    and rebuilt with the TRUSTED_TYPES. MLflow's own loaders are never called.
    """
    return _load_model_uri(uri, tracking_uri)[0]


def _load_model_uri(uri: str, tracking_uri: str | None,
                    check: BytesCheck | None = None) -> tuple[Any, list[str] | None]:
    data, name, flavors = _model_uri_bytes(uri, tracking_uri)
    if check is not None:
        check(data)
    return _rebuild(data, f"{uri} ({name})"), logged_class_names(uri, flavors)


def _model_uri_bytes(uri: str, tracking_uri: str | None,
                     trusted: bool = True) -> tuple[bytes, str, dict[str, Any]]:
    """The skops file of a logged model, its name and the MLmodel's flavors, checked first
    (unless not `trusted`: the bytes are then only hashed, never loaded)."""
    import tempfile

    import mlflow
    import mlflow.artifacts
    from mlflow.models import Model

    store.quiet_mlflow()
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    flavors = Model.load(uri).flavors
    name = trusted_model_file(uri, flavors) if trusted else _model_file_name(uri, flavors)
    base = uri.rstrip("/")
    if base.startswith("models:/m-") and base.count("/") == 1:
        # A logged model's id: MLflow would read `models:/m-.../file` as a registered name.
        base = mlflow.MlflowClient().get_logged_model(
            base.removeprefix("models:/")).artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{name}",
                                                    dst_path=tmp)
        return Path(local).read_bytes(), name, flavors


def logged_model_digest(uri: str, tracking_uri: str | None = None) -> str:
    """`model_integrity.model_digest` of a logged model's file, as the store holds it (what the
    register stage records). Hashing loads nothing: any scikit-learn model file is hashed."""
    return model_integrity.model_digest(_model_uri_bytes(uri, tracking_uri, trusted=False)[0])


def _model_file_name(uri: str, flavors: dict[str, Any]) -> str:
    """The model file a scikit-learn MLmodel names, whatever its format."""
    sklearn = flavors.get("sklearn")
    name = sklearn.get("pickled_model") if isinstance(sklearn, dict) else None
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(
            name).parts:
        raise UntrustedModelError(f"{uri} names no usable model file ({name!r})")
    return name


# Caps on what a model version's files may weigh: MLmodel is a page of YAML, the default model's
# skops file about 100 KB.
MAX_MLMODEL_BYTES = 1 << 20
MAX_MODEL_BYTES = 512 << 20


def load_model_files(read: Callable[[str, int], bytes], uri: str):
    """A logged model from its files, read by `read(name, max_bytes)` (see `registry_reader`).

    The same checks as `load_model_uri` without MLflow: the MLmodel file first (parsed as plain
    YAML data), then only the skops file it names, rebuilt with the TRUSTED_TYPES.
    """
    return _load_model_files(read, uri)[0]


def _load_model_files(read: Callable[[str, int], bytes], uri: str,
                      check: BytesCheck | None = None) -> tuple[Any, list[str] | None]:
    import yaml

    try:
        meta = yaml.safe_load(read("MLmodel", MAX_MLMODEL_BYTES))
    except yaml.YAMLError as exc:
        raise ModelFileError(f"{uri}: {mlmodel_yaml_problem(exc)}") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict):
        raise ModelFileError(f"{uri}: its MLmodel file declares no flavors")
    name = trusted_model_file(uri, flavors)
    names = logged_class_names(uri, flavors)
    data = read(name, MAX_MODEL_BYTES)
    if check is not None:
        check(data)
    return _rebuild(data, f"{uri} ({name})"), names


def mlmodel_yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: a `!!python/object` tag is refused, never constructed."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:200]
    return f"its MLmodel file is not plain YAML data ({problem}{where}): refused"


def inside_folder(folder: Path, name: str, uri: str) -> Path:
    """`folder / name`, unless it or a symlink on its way leads out of `folder`."""
    path = folder / name
    target, root = path.resolve(), folder.resolve()
    if not target.is_relative_to(root):
        how = "a symlink out of" if path.is_symlink() else "out of"
        raise UntrustedModelError(f"{uri}: {name} is {how} the model's folder (to {target}): "
                                  "refused")
    return path


# --- What `--model` names ---------------------------------------------------------------------


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
    if len(parts) == 2 and parts[1].isdigit() and not _ascii_version(parts[1]):
        raise ModelError(f"{uri}: a version is a number written with the digits 0-9, "
                         f"not {parts[1]!r}")
    if len(parts) == 2 and parts[1].isdigit():
        (name, version), alias = parts, None
        if int(version) > MAX_VERSION:  # no store holds it; PostgreSQL would answer with SQL
            versions = registry.versions(name) if registry.aliases(name) is not None else None
            if versions is None:
                raise ModelError(f"no registered model {name!r} in {tracking_uri}: train and "
                                 "register one with `make train`")
            raise ModelError(f"{name!r} has no version {version} "
                             f"(versions: {', '.join(map(str, versions)) or 'none'})")
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


MAX_VERSION = 2**31 - 1  # MLflow's version column is a 32-bit integer in PostgreSQL


def _ascii_version(text: str) -> bool:
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class ResolvedModel:
    """What `--model` names: the URI to load (a registry alias pinned to its version)."""

    requested: str
    uri: str
    description: str
    tracking_uri: str | None  # None for a local file or folder
    files: registry_reader.FileReader | None = None  # the version's files, read without MLflow
    registered: bool = False  # a registry version: its bytes are checked (`integrity_check`)
    expected_sha256: str | None = None  # the version's model_integrity.TAG, None if it has none

    def explain(self, message: str) -> str:
        """`message` about the loaded URI, saying which version an alias stood for."""
        if self.uri == self.requested:
            return message
        return f"{self.requested} is version {self.uri.rsplit('/', 1)[1]}: {message}"


def _pinned(registry: Callable[[], registry_reader.Registry], uri: str,
            tracking_uri: str) -> ResolvedModel:
    """`uri` pinned by the registry `registry()` opens; opening it may fail as reading does."""
    try:
        record = _registered_version(registry(), uri, tracking_uri)
    except (ModelError, registry_reader.Unsupported):
        raise
    except Exception as exc:  # MLflow, SQLAlchemy and the network fail in many ways
        message = registry_reader.short(
            str(getattr(exc, "message", None) or exc) or type(exc).__name__)
        raise ModelError(f"cannot resolve {uri} in {tracking_uri}: {message}") from None
    return ResolvedModel(uri, f"models:/{record.name}/{record.version}",
                         f"{uri} (version {record.version}, run {record.run_id})", tracking_uri,
                         record.read, registered=True, expected_sha256=record.model_sha256)


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
            return _pinned(lambda: registry_reader.open_registry(tracking_uri), uri,
                           tracking_uri)
        except registry_reader.Unsupported:
            pass
    store.quiet_mlflow()
    import_skops()  # before MLflow imports it: skops's table of trusted types, kept once
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if not uri.startswith("models:/"):
        return ResolvedModel(uri, uri, uri, tracking_uri)
    try:
        return _pinned(registry_reader.ClientRegistry, uri, tracking_uri)
    except registry_reader.Unsupported:
        return ResolvedModel(uri, uri, uri, tracking_uri)


def load_model(uri: str, mlflow_cfg: config.MlflowConfig) -> tuple[Any, str]:
    """The estimator `uri` names, and a description of it for the user.

    Logged models and MLflow model folders go through `load_model_uri`, which refuses anything
    but skops before loading a byte of it; `.skops` files through `load`.
    """
    resolved = resolve_model(uri, mlflow_cfg)
    return load_resolved(resolved), resolved.description


def load_named_model(uri: str,
                     mlflow_cfg: config.MlflowConfig) -> tuple[Any, list[str] | None, str]:
    """As `load_model`, with the class names the model was logged with (None for a bare
    `.skops` file or a model logged without them: the caller's parameter file names those)."""
    resolved = resolve_model(uri, mlflow_cfg)
    return (*load_resolved_named(resolved), resolved.description)


MODEL_FORMS = ("; --model takes models:/<name>@<alias>, models:/<name>/<version>, "
               "runs:/<run id>/model, an MLflow model folder or a .skops file")


def load_resolved(resolved: ResolvedModel) -> Any:
    """The estimator of a resolved `--model`; ModelError names it and the way out."""
    return load_resolved_named(resolved)[0]


def load_resolved_named(resolved: ResolvedModel) -> tuple[Any, list[str] | None]:
    """The estimator of a resolved `--model` and the class names it was logged with, if any."""
    uri, path = resolved.requested, Path(resolved.uri)
    try:
        if resolved.files is not None:
            return _load_model_files(resolved.files, resolved.uri, integrity_check(resolved))
        if resolved.tracking_uri is not None or (path / "MLmodel").is_file():
            return _load_model_uri(resolved.uri, resolved.tracking_uri,
                                   integrity_check(resolved))
        if not path.exists():  # a path, or a URI mistyped: not a reason to retrain
            raise ModelError(f"{path} not found{MODEL_FORMS}")
        return load(path), None
    except ModelFileError as exc:
        hint = "" if resolved.tracking_uri is not None or path.suffix == ".skops" else (
            MODEL_FORMS)
        raise ModelError(resolved.explain(f"{exc}{hint}")) from None
    except ModelError:
        raise
    except registry_reader.RegistryError as exc:
        raise ModelError(resolved.explain(f"cannot read the model: {exc}")) from None
    except Exception as exc:  # MLflow, SQLAlchemy and the network fail in many ways
        message = registry_reader.short(
            str(getattr(exc, "message", None) or exc) or type(exc).__name__)
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


# --- The served model (MLflow's pyfunc) -------------------------------------------------------


def load_served(resolved: ResolvedModel) -> Any:
    """`load_served_model` for a resolved `--model`: a registered version's bytes are checked."""
    return load_served_model(resolved.uri, resolved.tracking_uri, integrity_check(resolved))


def load_served_model(uri: str, tracking_uri: str | None = None,
                      check: BytesCheck | None = None) -> Any:
    """MLflow's PyFuncModel for `uri`, after checking its MLmodel names our skops model (and,
    with `check`, its skops file's bytes).

    The implementation is built by this checkout's `_load_pyfunc`: nothing from the model's
    stored code is imported and nothing is unpickled.
    """
    import mlflow.artifacts
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.pyfunc import PyFuncModel

    try:
        check_model_uri(uri, tracking_uri)  # before anything else is downloaded
        local = Path(mlflow.artifacts.download_artifacts(uri))
        meta = Model.load(inside_folder(local, "MLmodel", uri))
        name = trusted_model_file(uri, meta.flavors)  # the files as downloaded, checked again
        skops_file = inside_folder(local, name, uri)
        if check is not None:
            check(skops_file.read_bytes())
    except ModelIntegrityError as exc:
        raise ServeError(str(exc)) from None
    except ModelFileError as exc:
        raise ServeError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise ServeError(f"{uri}: {mlmodel_yaml_problem(exc)}") from None
    except (MlflowException, OSError) as exc:
        raise ServeError(f"{uri}: {getattr(exc, 'message', exc)}") from None
    except Exception as exc:  # an MLmodel of the wrong shape, a store failing in its own way
        message = " ".join(str(getattr(exc, "message", None) or exc).split())[:300]
        raise ServeError(f"{uri}: cannot read the model ({type(exc).__name__}: "
                         f"{message})") from None
    loader = meta.flavors.get(FLAVOR, {}).get("loader_module")
    if loader not in STORED_LOADER_MODULES:
        raise ServeError(f"{uri} is not a model this pipeline serves (python_function loader "
                         f"{loader!r}, expected {LOADER_MODULE!r}): retrain it with "
                         "`make train`")
    try:
        implementation = _load_pyfunc(str(local))
    except ModelFileError as exc:
        raise ServeError(f"{uri}: {exc}") from None
    return PyFuncModel(model_meta=meta, model_impl=implementation)


def _load_pyfunc(path: str) -> ServedModel:
    """Called by `mlflow.pyfunc.load_model` with the model directory (MLflow's loader protocol)."""
    from mlflow.models import Model

    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    flavors = Model.load(inside_folder(directory, "MLmodel", path)).flavors
    skops_file = inside_folder(directory, trusted_model_file(path, flavors), path)
    return ServedModel(load(skops_file), flavors[FLAVOR]["class_names"])


# --- A run's data files (not models) ----------------------------------------------------------


def download_run_files(run_id: str, artifact_path: str, destination: str | Path) -> Path:
    """A run's logged data files (the promotion gate's test predictions, the champion ledger's
    records) copied into `destination`. Their callers read them as data (numpy without pickle,
    JSON), never as a model; the download is here because every download from the store is."""
    store.quiet_mlflow()
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(destination)))
