"""The schema catches bad configuration before any work, naming the key and what was expected."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from pipeline.support import config, estimators, store
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


def check(params: dict) -> config.Config:
    """What a training stage does with a configuration: the schema, then the model's own rules."""
    cfg = config.validate(params)
    estimators.check_params(cfg.model)
    return cfg


def test_committed_params_are_valid() -> None:
    cfg = check(PARAMS)
    assert estimators.check_params(cfg.model).kind == "softmax"
    assert cfg.mlflow.registered_model == "fashion-mnist-softmax"
    assert cfg.mlflow.promotion.metric == "test_accuracy"
    assert cfg.mlflow.promotion.greater_is_better


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("model.learning_rate", 0, "model.learning_rate=0 is invalid: expected a float in the "
                                   "range (0.0, inf)"),
        ("model.learning_rate", -0.1, "model.learning_rate=-0.1"),
        ("model.learning_rate", float("nan"), "model.learning_rate=nan"),
        ("model.epochs", 0, "model.epochs=0 is invalid: expected an int in the range [1, inf)"),
        ("model.optimizer", "rmsprop", "model.optimizer='rmsprop' is invalid: expected a str "
                                       "among {'adam', 'sgd'}"),
        ("model.lr_schedule", "linear", "model.lr_schedule='linear' is invalid: expected a str "
                                        "among {'constant', 'cosine', 'step'}"),
        ("model.pixel_transform", "log", "model.pixel_transform"),
        ("model.batch_size", "big", "model.batch_size='big'"),
        ("model.random_state", -1, "model.random_state=-1"),
        ("model._target_", "xgboost.XGBClassifier", "model._target_='xgboost.XGBClassifier'"),
        ("data.val_size", 0, "data.val_size=0"),
        ("data.val_size", 60_000, "between 1 and 59999"),
        ("data.files.train_images.md5", "abc", "data.files.train_images.md5"),
        ("mlflow.promotion.metric", "accuracy", "mlflow.promotion.metric"),
        ("mlflow.promotion.min_improvement", -1, "min_improvement"),
        ("mlflow.registered_model", " ", "mlflow.registered_model"),
    ],
)
def test_bad_values_name_the_key(path: str, value, message: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        check(with_change(path, value))


def test_unknown_key_is_rejected_with_its_full_name() -> None:
    with pytest.raises(config.ConfigError, match="model.momentom is not a parameter of "
                       r"pipeline\.core\.estimator\.SoftmaxRegression; allowed keys: optimizer"):
        check(with_change("model.momentom", 0.9))


def test_model_groups_have_their_own_parameters() -> None:
    params = copy.deepcopy(PARAMS)
    params["model"] = yaml.safe_load((REPO_ROOT / "conf/model/sklearn_logreg.yaml").read_text())
    spec = estimators.check_params(check(params).model)
    assert spec.kind == "sklearn_logreg"
    assert spec.run_name == "C1 it100 logreg"
    params["model"]["learning_rate"] = 0.1  # a softmax key is not a logreg key
    with pytest.raises(config.ConfigError, match="model.learning_rate is not a parameter"):
        check(params)
    del params["model"]["learning_rate"]
    del params["model"]["C"]
    with pytest.raises(config.ConfigError, match="model.C is missing"):
        check(params)


def test_load_reports_the_file(tmp_path) -> None:
    missing = tmp_path / "params.yaml"
    with pytest.raises(config.ConfigError, match="make params"):
        config.load(missing)
    missing.write_text("data: [unclosed")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(missing)


def test_the_model_is_built_from_its_keys_as_they_are() -> None:
    """One vocabulary: every key of conf/model/softmax.yaml is a parameter of the estimator."""
    from pipeline.core.estimator import SoftmaxRegression

    spec = estimators.check_params(check(PARAMS).model)
    built = estimators.build(spec)
    assert isinstance(built, SoftmaxRegression)
    params = {key: value for key, value in PARAMS["model"].items() if key != "_target_"}
    assert built.get_params() == {**SoftmaxRegression().get_params(), **params}
    assert spec.run_name == "lr0.005 ep5 bs512 adam"


def test_tracking_uri_precedence_and_dvc_temp_copies(tmp_path, monkeypatch) -> None:
    mlflow_cfg = config.validate(PARAMS).mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert store.tracking_uri(mlflow_cfg) == "sqlite:///mlflow.db"
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)  # where `dvc exp run --temp` runs the stages
    assert store.tracking_uri(mlflow_cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.tracking_uri(mlflow_cfg) == "http://127.0.0.1:5000"
    assert store.model_uri(mlflow_cfg) == "models:/fashion-mnist-softmax@champion"


def test_infinite_power_is_refused() -> None:
    with pytest.raises(config.ConfigError, match="model.power=inf"):
        check(with_change("model.power", float("inf")))


def test_allowed_strings_are_listed_in_one_order() -> None:
    """scikit-learn lists them in hash order, which changes from process to process."""
    assert estimators._STRING_SET.sub(
        estimators._sorted_set, "a str among {'sgd', 'adam'} or None") == (
        "a str among {'adam', 'sgd'} or None")
