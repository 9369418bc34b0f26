"""The typed schema of the pipeline's configuration, and one loader that every stage uses.

Hydra composes `conf/` into a plain tree; this module checks that tree against dataclasses before
any work starts, so a typo or an out-of-range value fails at once with the key's full name instead
of half-way through a training run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.core.errors import PipelineError

PARAMS_FILE = "params.yaml"


class ConfigError(PipelineError, ValueError):
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


# Metrics the evaluate stage writes, and whether more is better.
PROMOTION_METRICS = {
    "test_accuracy": True,
    "test_f1_macro": True,
    "test_f1_weighted": True,
    "test_precision_macro": True,
    "test_recall_macro": True,
    "test_log_loss": False,
}


# How the register stage tells a gain from noise (pipeline.core.paired_tests): McNemar's exact
# test compares accuracies only; the paired bootstrap any promotion metric; none: the raw gain.
PROMOTION_TESTS = ("mcnemar", "bootstrap", "none")


@dataclass
class PromotionConfig:
    metric: str = "test_accuracy"
    min_improvement: float = 0.0
    test: str = "mcnemar"
    alpha: float = 0.05
    bootstrap_samples: int = 1000

    def __post_init__(self) -> None:
        _require(self.metric in PROMOTION_METRICS, "mlflow.promotion.metric", self.metric,
                 f"one of {sorted(PROMOTION_METRICS)}")
        _require(self.min_improvement >= 0, "mlflow.promotion.min_improvement",
                 self.min_improvement, "a number >= 0")
        _require(self.test in PROMOTION_TESTS, "mlflow.promotion.test", self.test,
                 f"one of {', '.join(PROMOTION_TESTS)}")
        _require(self.test != "mcnemar" or self.metric == "test_accuracy",
                 "mlflow.promotion.test", self.test,
                 f"bootstrap or none with metric {self.metric} (McNemar compares accuracies)")
        _require(0 < self.alpha < 1, "mlflow.promotion.alpha", self.alpha,
                 "a number between 0 and 1, e.g. 0.05")
        _require(self.bootstrap_samples >= 100, "mlflow.promotion.bootstrap_samples",
                 self.bootstrap_samples, "an integer >= 100")

    @property
    def greater_is_better(self) -> bool:
        return PROMOTION_METRICS[self.metric]


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "fashion-mnist"
    registered_model: str = "fashion-mnist-softmax"
    promotion: PromotionConfig = field(default_factory=PromotionConfig)

    def __post_init__(self) -> None:
        for key in ("tracking_uri", "experiment", "registered_model"):
            _require(bool(getattr(self, key).strip()), f"mlflow.{key}", getattr(self, key),
                     "a non-empty string")


@dataclass
class Config:
    data: DataConfig = MISSING
    # `_target_` and the estimator's own parameters, checked by the estimator's own rules
    # (`pipeline.support.estimators.check_params`, which only the stages that train call, so that
    # download and split do not depend on the estimator's code): no second copy lives here.
    model: dict[str, Any] = MISSING
    mlflow: MlflowConfig = MISSING


def validate(raw: DictConfig | dict) -> Config:
    """Merge `raw` into the schema and build the typed config; ConfigError names the bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
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
