"""The schema catches bad configuration before any work, naming the key and what was expected."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline import config
from tests.synthetic import REPO_ROOT

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def with_change(path: str, value) -> dict:
    params = copy.deepcopy(PARAMS)
    *parents, leaf = path.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    return params


def test_committed_params_are_valid() -> None:
    cfg = config.validate(PARAMS)
    assert isinstance(cfg.model, config.SoftmaxConfig)
    assert cfg.mlflow.registered_model == "fashion-mnist-softmax"
    assert cfg.mlflow.promotion.metric == "test_accuracy"
    assert cfg.mlflow.promotion.greater_is_better


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("model.lr", 0, "model.lr=0"),
        ("model.lr", -0.1, "model.lr=-0.1"),
        ("model.epochs", 0, "model.epochs=0"),
        ("model.optimizer", "rmsprop", "one of ('adam', 'sgd')"),
        ("model.lr_schedule", "linear", "model.lr_schedule"),
        ("model.pixel_transform", "log", "model.pixel_transform"),
        ("model.batch_size", "big", "model.batch_size"),
        ("model.name", "xgboost", "model.name='xgboost'"),
        ("data.val_size", 0, "data.val_size=0"),
        ("data.val_size", 60_000, "between 1 and 59999"),
        ("data.files.train_images.md5", "abc", "data.files.train_images.md5"),
        ("mlflow.promotion.metric", "accuracy", "mlflow.promotion.metric"),
        ("mlflow.promotion.min_improvement", -1, "min_improvement"),
        ("mlflow.registered_model", " ", "mlflow.registered_model"),
    ],
)
def test_bad_values_name_the_key(path: str, value, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.")):
        config.validate(with_change(path, value))


def test_unknown_key_is_rejected_with_its_full_name() -> None:
    with pytest.raises(config.ConfigError, match="model.momentom"):
        config.validate(with_change("model.momentom", 0.9))


def test_model_groups_have_their_own_schema() -> None:
    params = copy.deepcopy(PARAMS)
    params["model"] = yaml.safe_load((REPO_ROOT / "conf/model/sklearn_logreg.yaml").read_text())
    assert isinstance(config.validate(params).model, config.LogRegConfig)
    params["model"]["lr"] = 0.1  # a softmax key is not a logreg key
    with pytest.raises(config.ConfigError, match="model.lr"):
        config.validate(params)


def test_load_reports_the_file(tmp_path) -> None:
    missing = tmp_path / "params.yaml"
    with pytest.raises(config.ConfigError, match="make params"):
        config.load(missing)
    missing.write_text("data: [unclosed")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(missing)


def test_softmax_defaults_match_the_estimator() -> None:
    """conf/model/softmax.yaml is the estimator's defaults: one source of truth for both."""
    from pipeline import models
    from pipeline.core.estimator import SoftmaxRegression

    built = models.build(config.validate(PARAMS).model).get_params()
    assert built == SoftmaxRegression().get_params()


def test_tracking_uri_precedence_and_dvc_temp_copies(tmp_path, monkeypatch) -> None:
    mlflow_cfg = config.validate(PARAMS).mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert mlflow_cfg.resolved_tracking_uri == "sqlite:///mlflow.db"
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)  # where `dvc exp run --temp` runs the stages
    assert mlflow_cfg.resolved_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_cfg.resolved_tracking_uri == "http://127.0.0.1:5000"


def test_schema_vocabularies_are_the_estimators() -> None:
    from pipeline.core import estimator, preprocessing

    assert set(config.OPTIMIZERS) == set(estimator.OPTIMIZERS)
    assert set(config.LR_SCHEDULES) == set(estimator.LR_SCHEDULES)
    assert set(config.SCALINGS) == set(preprocessing.SCALINGS)
    assert set(config.PIXEL_TRANSFORMS) == set(preprocessing.TRANSFORMS)


def test_infinite_power_is_refused_by_the_schema() -> None:
    with pytest.raises(config.ConfigError, match="model.power=inf"):
        config.validate(with_change("model.power", float("inf")))
