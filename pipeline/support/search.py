"""The search space of `make tune` (conf/search/*.yaml), checked before anything runs.

A search file names an objective measured on the validation split, a pruner, and one Optuna
distribution per model parameter (the estimator's own parameter names, as in conf/model/):

    objective: val_log_loss          # or val_accuracy
    pruner: median                   # median | hyperband | none
    space:
      learning_rate: {type: float, low: 0.003, high: 0.03, log: true}
      hinges: {type: int, low: 0, high: 3}
      batch_size: {type: categorical, choices: [256, 512, 1024]}

Every bound and choice is checked by the estimator's own rules, so a value that would fail a
trial half-way through a study fails here instead, with its key named (`search.space.<name>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.support import estimators
from pipeline.support.config import ConfigError

# objective -> (direction, the per-epoch history key reported to the pruner)
OBJECTIVES = {
    "val_log_loss": ("minimize", "val_loss"),
    "val_accuracy": ("maximize", "val_accuracy"),
}
PRUNERS = ("median", "hyperband", "none")
_FIELDS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
           "categorical": {"choices"}}


@dataclass(frozen=True)
class Dimension:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def extremes(self) -> list[Any]:
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    objective: str
    pruner: str
    dimensions: tuple[Dimension, ...]

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective][0]

    @property
    def epoch_key(self) -> str:
        return OBJECTIVES[self.objective][1]


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _dimension(name: str, raw: Any) -> Dimension:
    key = f"search.space.{name}"
    if not isinstance(raw, dict) or raw.get("type") not in _FIELDS:
        _fail(key, raw, "a mapping with type: float, int or categorical")
    kind = raw["type"]
    unknown = sorted(set(raw) - _FIELDS[kind] - {"type"})
    if unknown:
        _fail(f"{key}.{unknown[0]}", raw[unknown[0]],
              f"no such field for type {kind}; allowed: {', '.join(sorted(_FIELDS[kind]))}")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices or not all(
                choice is None or isinstance(choice, bool | int | float | str)
                for choice in choices):
            _fail(f"{key}.choices", choices, "a non-empty list of numbers, strings or null")
        return Dimension(name, kind, choices=tuple(choices))
    number = int if kind == "int" else (int, float)
    low, high = raw.get("low"), raw.get("high")
    for field_name, value in (("low", low), ("high", high)):
        if not isinstance(value, number) or isinstance(value, bool):
            _fail(f"{key}.{field_name}", value, f"a{'n' if kind == 'int' else ''} {kind}")
    if not low < high:
        _fail(f"{key}.high", high, f"a number above low={low}")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        _fail(f"{key}.log", log, "true or false")
    if log and low <= 0:
        _fail(f"{key}.low", low, "a number > 0 with log: true")
    step = raw.get("step")
    if step is not None and (log or not isinstance(step, number) or step <= 0):
        _fail(f"{key}.step", step, "a positive number, and no step with log: true")
    return Dimension(name, kind, float(low) if kind == "float" else low,
                     float(high) if kind == "float" else high, log, step)


def parse(raw: Any, model: dict[str, Any]) -> SearchSpace:
    """The `search` node, checked against the model group it searches; ConfigError names the key."""
    if not isinstance(raw, dict):
        _fail("search", raw, "a mapping with objective, pruner and space")
    unknown = sorted(set(raw) - {"objective", "pruner", "space"})
    if unknown:
        _fail(f"search.{unknown[0]}", raw[unknown[0]],
              "no such key; allowed keys: objective, pruner, space")
    objective = raw.get("objective", "val_log_loss")
    if objective not in OBJECTIVES:
        _fail("search.objective", objective, f"one of {', '.join(OBJECTIVES)}")
    pruner = raw.get("pruner", "median")
    if pruner not in PRUNERS:
        _fail("search.pruner", pruner, f"one of {', '.join(PRUNERS)}")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        _fail("search.space", space, "a non-empty mapping of model parameters to ranges")
    dimensions = tuple(_dimension(str(name), value) for name, value in space.items())
    base = estimators.check_params(model)
    for dimension in dimensions:
        for value in dimension.extremes():
            try:
                estimators.check_params({"_target_": base.target, **base.params,
                                     dimension.name: value})
            except ConfigError as exc:
                raise ConfigError(f"search.space.{dimension.name}: {exc}") from None
    return SearchSpace(objective, pruner, dimensions)


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """One point of the space, drawn by the trial's sampler: {model parameter: value}."""
    params: dict[str, Any] = {}
    for d in space.dimensions:
        if d.type == "categorical":
            params[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.type == "int":
            params[d.name] = trial.suggest_int(d.name, d.low, d.high, log=d.log,
                                               step=d.step or 1)
        else:
            params[d.name] = trial.suggest_float(d.name, d.low, d.high, log=d.log, step=d.step)
    return params
