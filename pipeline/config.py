"""The typed schema of the pipeline's configuration, and one loader that every stage uses.

Hydra composes `conf/` into a plain tree; this module checks that tree against dataclasses before
any work starts, so a typo or an out-of-range value fails at once with the key's full name instead
of half-way through a training run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A configuration value that the pipeline cannot use; the message names the key."""


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


@dataclass
class FileSpec:
    name: str
    md5: str


@dataclass
class DownloadConfig:
    retries: int = 3
    backoff: float = 1.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        _require(self.retries >= 1, "data.download.retries", self.retries, "an integer >= 1")
        _require(self.backoff >= 0, "data.download.backoff", self.backoff, "seconds >= 0")
        _require(self.timeout > 0, "data.download.timeout", self.timeout, "seconds > 0")


FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
N_OFFICIAL_TRAIN = 60_000


@dataclass
class DataConfig:
    raw_dir: str = "data/raw"
    extra_dir: str = "data/extra"
    split_dir: str = "data/split"
    mirrors: list[str] = MISSING
    files: dict[str, FileSpec] = MISSING
    download: DownloadConfig = field(default_factory=DownloadConfig)
    val_size: int = 10_000
    seed: int = 42
    class_names: list[str] = MISSING

    def __post_init__(self) -> None:
        _require(
            sorted(self.files) == sorted(FILE_KEYS), "data.files", sorted(self.files),
            f"exactly the keys {list(FILE_KEYS)}",
        )
        for key, spec in self.files.items():
            _require(
                len(spec.md5) == 32 and all(c in "0123456789abcdef" for c in spec.md5),
                f"data.files.{key}.md5", spec.md5, "32 lowercase hexadecimal digits",
            )
        _require(
            0 < self.val_size < N_OFFICIAL_TRAIN, "data.val_size", self.val_size,
            f"an integer between 1 and {N_OFFICIAL_TRAIN - 1}",
        )
        _require(self.seed >= 0, "data.seed", self.seed, "an integer >= 0")
        _require(
            len(self.class_names) == 10 and len(set(self.class_names)) == 10,
            "data.class_names", self.class_names, "10 distinct names",
        )


# The estimator's vocabularies, repeated so that reading a config does not import scikit-learn
# (a second of start-up); tests/test_config.py keeps them equal to the estimator's.
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step")
SCALINGS = ("standard", "minmax")
PIXEL_TRANSFORMS = ("power", "sqrt", None)


@dataclass
class _PreprocessingFields:
    scaling: str = "standard"
    pixel_transform: str | None = "power"
    power: float = 0.3

    def _check_preprocessing(self) -> None:
        _require(self.scaling in SCALINGS, "model.scaling", self.scaling, f"one of {SCALINGS}")
        _require(
            self.pixel_transform in PIXEL_TRANSFORMS, "model.pixel_transform",
            self.pixel_transform, f"one of {PIXEL_TRANSFORMS}",
        )
        _require(0 < self.power < float("inf"), "model.power", self.power,
                 "a finite number > 0")


@dataclass
class SoftmaxConfig(_PreprocessingFields):
    """Our `SoftmaxRegression`; keys match its parameters except `lr` (learning_rate), `seed`."""

    name: str = "softmax"
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    batch_size: int = 512
    epochs: int = 4
    lr_schedule: str = "cosine"
    l2: float = 1e-3
    early_stopping: bool = False
    patience: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_preprocessing()
        _require(self.optimizer in OPTIMIZERS, "model.optimizer", self.optimizer,
                 f"one of {OPTIMIZERS}")
        _require(self.lr_schedule in LR_SCHEDULES, "model.lr_schedule", self.lr_schedule,
                 f"one of {LR_SCHEDULES}")
        _require(0 < self.lr < float("inf"), "model.lr", self.lr, "a finite number > 0")
        _require(0 <= self.momentum < 1, "model.momentum", self.momentum, "0 <= momentum < 1")
        _require(self.batch_size >= 1, "model.batch_size", self.batch_size, "an integer >= 1")
        _require(self.epochs >= 1, "model.epochs", self.epochs, "an integer >= 1")
        _require(0 <= self.l2 < float("inf"), "model.l2", self.l2, "a finite number >= 0")
        _require(self.patience >= 1, "model.patience", self.patience, "an integer >= 1")
        _require(self.seed >= 0, "model.seed", self.seed, "an integer >= 0")


@dataclass
class LogRegConfig(_PreprocessingFields):
    """scikit-learn's `LogisticRegression` (lbfgs) on the same preprocessing: the baseline."""

    name: str = "sklearn_logreg"
    C: float = 1.0
    max_iter: int = 100
    tol: float = 1e-4

    def __post_init__(self) -> None:
        self._check_preprocessing()
        _require(0 < self.C < float("inf"), "model.C", self.C, "a finite number > 0")
        _require(self.max_iter >= 1, "model.max_iter", self.max_iter, "an integer >= 1")
        _require(0 < self.tol < float("inf"), "model.tol", self.tol, "a finite number > 0")


MODEL_SCHEMAS: dict[str, type] = {"softmax": SoftmaxConfig, "sklearn_logreg": LogRegConfig}

# Metrics the evaluate stage writes, and whether more is better.
PROMOTION_METRICS = {
    "test_accuracy": True,
    "test_f1_macro": True,
    "test_f1_weighted": True,
    "test_precision_macro": True,
    "test_recall_macro": True,
    "test_log_loss": False,
}


@dataclass
class PromotionConfig:
    metric: str = "test_accuracy"
    min_improvement: float = 0.0

    def __post_init__(self) -> None:
        _require(self.metric in PROMOTION_METRICS, "mlflow.promotion.metric", self.metric,
                 f"one of {sorted(PROMOTION_METRICS)}")
        _require(self.min_improvement >= 0, "mlflow.promotion.min_improvement",
                 self.min_improvement, "a number >= 0")

    @property
    def greater_is_better(self) -> bool:
        return PROMOTION_METRICS[self.metric]


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "fashion-mnist"
    registered_model: str = "fashion-mnist-softmax"
    promotion: PromotionConfig = field(default_factory=PromotionConfig)

    @property
    def resolved_tracking_uri(self) -> str:
        """$MLFLOW_TRACKING_URI wins over the configured store, as everywhere in MLflow.

        A relative sqlite store is anchored at the project: `dvc exp run --temp` and `--queue`
        run the stages in a copy under .dvc/tmp/exps/, where it would be a new, throw-away
        store whose registry knows no champion.
        """
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri
        store = local_store_path(uri)
        if urlsplit(uri).scheme == "sqlite" and store is not None and not store.is_absolute():
            parts = Path.cwd().parts
            for i in range(1, len(parts) - 2):
                if parts[i:i + 3] == (".dvc", "tmp", "exps"):
                    return f"sqlite:///{Path(*parts[:i]) / store}"
        return uri

    def __post_init__(self) -> None:
        for key in ("tracking_uri", "experiment", "registered_model"):
            _require(bool(getattr(self, key).strip()), f"mlflow.{key}", getattr(self, key),
                     "a non-empty string")


def local_store_path(tracking_uri: str) -> Path | None:
    """The file or folder behind a local tracking URI (sqlite or file store); None for a server."""
    parts = urlsplit(tracking_uri)
    if parts.scheme == "sqlite":
        database = parts.path[1:]  # sqlite:///rel.db -> rel.db; sqlite:////abs.db -> /abs.db
        return Path(database) if database and database != ":memory:" else None
    if parts.scheme in ("", "file"):
        return Path(parts.path)
    return None


@dataclass
class Config:
    data: DataConfig = MISSING
    model: Any = MISSING
    mlflow: MlflowConfig = MISSING


def validate(raw: DictConfig | dict) -> Config:
    """Merge `raw` into the schema and build the typed config; ConfigError names the bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        name = OmegaConf.select(merged, "model.name", default=None)
        if name not in MODEL_SCHEMAS:
            raise ConfigError(
                f"model.name={name!r} is invalid: expected one of {sorted(MODEL_SCHEMAS)} "
                "(choose a config group with `model=softmax` or `model=sklearn_logreg`)"
            )
        try:
            merged.model = OmegaConf.merge(
                OmegaConf.structured(MODEL_SCHEMAS[name]), merged.model
            )
        except OmegaConfBaseException as exc:  # the node is merged alone: restore the prefix
            exc.full_key = f"model.{getattr(exc, 'full_key', None) or '?'}"
            raise
        config = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        schema = getattr(exc, "object_type", None)
        if isinstance(exc, ConfigKeyError) and dataclasses.is_dataclass(schema):
            reason += f"; allowed keys: {', '.join(f.name for f in dataclasses.fields(schema))}"
        raise ConfigError(f"invalid configuration at key {key!r}: {reason}") from None
    assert isinstance(config, Config)
    return config


def load(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate a composed parameter file such as `params.yaml`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: parameter file not found; run `make params` to compose it from conf/"
        )
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in several exception types
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return validate(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
