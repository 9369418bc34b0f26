"""From the `model` config group to a fitted estimator.

The config keys are the estimator's own parameter names, so building a model is
`factory(**params)` and checking the values is the estimator's own parameter validation
(scikit-learn's `_parameter_constraints`): there is no second copy of the defaults or the rules.
Whatever the kind, `fit` returns a per-epoch history in the same shape. Writing the fitted model
is `model_files`' job; loading one, `model_loader`'s.
"""

from __future__ import annotations

import importlib
import inspect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.support.config import ConfigError


@dataclass(frozen=True)
class Kind:
    """A model the pipeline can train: its short name and how a run of it is named."""

    name: str
    run_name: Callable[[dict[str, Any]], str]


# `_target_` -> kind. Only these factories may be instantiated from a configuration.
KINDS: dict[str, Kind] = {
    # Short, and what differs between runs first: the UI's run list cuts names at about 20
    # characters (the kind is the `model` tag).
    "pipeline.core.estimator.SoftmaxRegression": Kind(
        "softmax", lambda p: f"lr{p['learning_rate']:g} ep{p['epochs']} bs{p['batch_size']} "
                             f"{p['optimizer']}"),
    "pipeline.core.baseline.make_logistic_regression": Kind(
        "sklearn_logreg", lambda p: f"C{p['C']:g} it{p['max_iter']} logreg"),
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
