"""The search space of `make tune`: checked against the model before anything runs."""

from __future__ import annotations

import optuna
import pytest
import yaml

from pipeline.support import search
from pipeline.support.config import ConfigError
from tests.synthetic import CONF_DIR, default_section

MODEL = default_section("model", "softmax")


def committed() -> dict:
    return yaml.safe_load((CONF_DIR / "search" / "softmax.yaml").read_text())


def test_the_committed_search_space_fits_the_default_model():
    space = search.parse(committed(), MODEL)
    assert space.direction == "minimize" and space.epoch_key == "val_loss"
    assert {d.name for d in space.dimensions} >= {"learning_rate", "l2", "epochs", "hinges"}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"space": {"momentom": {"type": "float", "low": 0.1, "high": 0.9}}},
         "search.space.momentom: model.momentom is not a parameter"),
        ({"space": {"learning_rate": {"type": "float", "low": -1.0, "high": 0.1}}},
         "search.space.learning_rate: model.learning_rate=-1.0 is invalid"),
        ({"space": {"hinges": {"type": "int", "low": 0, "high": 2.5}}},
         "search.space.hinges.high=2.5 is invalid"),
        ({"space": {"l2": {"type": "float", "low": 0.1, "high": 0.01}}},
         "search.space.l2.high=0.01 is invalid"),
        ({"space": {"l2": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}},
         "search.space.l2.low=0.0 is invalid"),
        ({"space": {"l2": {"type": "uniform", "low": 0.0, "high": 0.01}}},
         "search.space.l2="),
        ({"space": {"l2": {"type": "float", "low": 0.0, "high": 0.01, "choices": [1]}}},
         "search.space.l2.choices=[1] is invalid"),
        ({"space": {"optimizer": {"type": "categorical", "choices": ["adam", "rmsprop"]}}},
         "search.space.optimizer: model.optimizer='rmsprop' is invalid"),
        ({"objective": "test_accuracy"}, "search.objective='test_accuracy' is invalid"),
        ({"pruner": "asha"}, "search.pruner='asha' is invalid"),
        ({"sampler": "tpe"}, "search.sampler='tpe' is invalid: expected no such key"),
        ({"space": {}}, "search.space={} is invalid"),
    ],
)
def test_a_bad_search_space_names_the_key(change, key):
    raw = {**committed(), **change}
    with pytest.raises(ConfigError) as caught:
        search.parse(raw, MODEL)
    assert key in str(caught.value)


def test_suggestions_stay_inside_the_space_and_are_valid_models():
    from pipeline.support import estimators

    space = search.parse(committed(), MODEL)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = search.suggest(trial, space)
        estimators.check_params({**MODEL, **params})
        for dimension in space.dimensions:
            value = params[dimension.name]
            if dimension.type == "categorical":
                assert value in dimension.choices
            else:
                assert dimension.low <= value <= dimension.high
        study.tell(trial, 0.0)
