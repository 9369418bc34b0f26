"""Stage `train`: fit the configured model and open the pipeline's MLflow run.

Usage: python -m pipeline.stages.train [--params params.yaml]

Writes the model file, the learning curves and `models/run.json`, which names the MLflow run that
the evaluate and register stages resume: one pipeline execution is one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.files import atomic_write_text
from pipeline.core.split import check_manifest, load_split
from pipeline.support import config, tracking
from pipeline.support.outputs import Outputs
from pipeline.support.stage import stage_main

# scikit-learn, pandas, matplotlib and MLflow are imported where used: a bad configuration is
# reported in about a second instead of after several seconds of imports.


def _log_inputs(cfg: config.Config, splits: dict[str, tuple], digest: str | None) -> None:
    import mlflow.data

    for split, (features, labels) in splits.items():
        dataset = mlflow.data.from_numpy(
            features, targets=labels, name=f"fashion-mnist-{split}",
            source=str(Path(cfg.data.split_dir).resolve()), digest=digest)
        mlflow.log_input(dataset, context="training" if split == "train" else split)


def _iterative_solver(estimator: Any) -> Any | None:
    """The scikit-learn step that reports its solver's iterations (lbfgs), if any.

    scikit-learn 1.9's callbacks (`set_callbacks`) call back once per lbfgs iteration; our own
    SoftmaxRegression reports epochs through `fit(callback=...)` instead.
    """
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return final if hasattr(final, "set_callbacks") and hasattr(final, "solver") else None


class _IterationCounter:
    """A scikit-learn FitCallback: one step of the progress bar per finished solver iteration."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def setup(self, estimator: Any, context: Any) -> None:
        pass

    def teardown(self, estimator: Any, context: Any) -> None:
        pass

    def on_fit_task_begin(self, estimator: Any, context: Any) -> None:
        pass

    def on_fit_task_end(self, estimator: Any, context: Any, *, X: Any = None) -> None:
        # The solver's last, empty iteration task comes without data: it did not run.
        if context.task_name.endswith("-iter") and X is not None:
            self.bar.update(1)


@contextlib.contextmanager
def _iterations_shown(solver: Any | None, bar: Any) -> Iterator[None]:
    """Count the solver's iterations on `bar`; the callback is removed before the model is saved
    (it would otherwise be written into the model file)."""
    if solver is None:
        yield
        return
    solver.set_callbacks(_IterationCounter(bar))
    try:
        yield
    finally:
        solver.set_callbacks()


@contextlib.contextmanager
def _one_line_convergence_warning() -> Iterator[None]:
    """scikit-learn's ConvergenceWarning, a multi-line message under a site-packages path,
    as one line that says what to change; other warnings pass through unchanged."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            first = str(warning.message).strip().splitlines()[0].rstrip(":. ")
            print(f"train: warning: {first}; the model is saved as it is; raise model.max_iter "
                  "(or model.tol) for a converged fit", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)


def train(cfg: config.Config, out: Outputs, source: str,
          overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Fit, record everything in a new MLflow run, write the outputs; returns the run file."""
    import mlflow
    import pandas as pd
    from tqdm import tqdm

    from pipeline.core.estimator import HISTORY_KEYS
    from pipeline.support import estimators, figures, model_files, pyfunc_model

    check_manifest(cfg.data.split_dir, cfg.data.val_size, cfg.data.seed,
                   {key: spec.md5 for key, spec in cfg.data.files.items()})
    X, y = load_split(cfg.data.split_dir, "train")
    X_val, y_val = load_split(cfg.data.split_dir, "val")
    spec = estimators.check_params(cfg.model)
    estimator = estimators.build(spec)
    resolved = dataclasses.asdict(cfg)
    commit, dirty = tracking.git_commit()
    data_version = tracking.data_version(cfg.data)
    tags = {"model": spec.kind, "source": source, "git_commit": commit,
            "git_dirty": str(dirty).lower(), **data_version, **tracking.dvc_experiment_tags(),
            **tracking.process_tags()}
    if overrides:
        tags["hydra_overrides"] = " ".join(overrides)
    tags[tracking.NOTE] = tracking.describe_training(spec.run_name, spec.kind, len(y), len(y_val),
                                                     tags.get("dvc_exp_name"))

    with mlflow.start_run(run_name=spec.run_name, tags=tags) as run:
        mlflow.set_experiment_tag(tracking.NOTE, tracking.EXPERIMENT_DESCRIPTION)
        mlflow.log_params(tracking.run_params(cfg, spec.all_params, spec.target))
        mlflow.log_dict(resolved, "config/params.yaml")
        _log_inputs(cfg, {"train": (X, y), "validation": (X_val, y_val)},
                    data_version.get("split_manifest_md5"))

        solver = _iterative_solver(estimator)
        unit = "iteration" if solver is not None else "epoch"
        bar = tqdm(total=spec.all_params.get("max_iter" if solver is not None else "epochs"),
                   desc=f"train ({solver.solver})" if solver is not None else "train",
                   unit=unit, file=sys.stderr)

        curves: list[Any] = []  # logged in one request after the fit

        def on_epoch(record: dict[str, Any]) -> None:
            curves.extend(tracking.epoch_metrics(record))
            bar.set_postfix({"loss": f"{record['train_loss']:.4f}",
                             "val_acc": f"{record['val_accuracy']:.4f}"})
            if solver is None:
                bar.update(1)

        started = time.perf_counter()
        with _one_line_convergence_warning(), bar, _iterations_shown(solver, bar):
            history = estimators.fit(estimator, X, y, X_val, y_val, on_epoch)
        seconds = time.perf_counter() - started
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=curves)
        best = estimators.best_epoch(estimator, history)
        final = next(row for row in history if row["epoch"] == best)
        # metrics/train.json holds what the data and the code decide, so a clone that retrains
        # reproduces it; the wall time belongs to this moment: MLflow and models/run.json.
        summary = {
            "epochs_run": history[-1]["epoch"],
            "best_epoch": best,
            **{key: final[key] for key in ("train_loss", "train_accuracy", "val_loss",
                                           "val_accuracy")},
        }
        # val_* come from the evaluate stage, measured on the final model.
        mlflow.log_metrics({"train_seconds": seconds, **{
            key: float(value) for key, value in summary.items() if not key.startswith("val_")}})

        atomic_write_text(out.history,
                          pd.DataFrame(history, columns=list(HISTORY_KEYS)).to_csv(index=False))
        atomic_write_text(out.train_metrics, json.dumps(summary, indent=2) + "\n")
        curves = figures.learning_curves_figure(history)
        figures.save(curves, out.learning_curves)
        figures.close(curves)
        for path in (out.learning_curves, out.history):
            mlflow.log_artifact(str(path), artifact_path="training")
        tracking.log_comparable(out.learning_curves.parent)  # for the compare page

        model_files.save(estimator, out.model)
        info = pyfunc_model.log_model(
            estimator,
            cfg.data.class_names,
            input_example=X[:2],
            pip_requirements=model_files.pip_requirements(),
            code_paths=[str(Path(__file__).parents[1])],
        )
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                  "run_name": run.info.run_name, "model_uri": info.model_uri,
                  "train_seconds": round(seconds, 3)}
        tracking.write_run_file(out.run, **record)
    print(f"train: {run.info.run_name}: val_accuracy {summary['val_accuracy']:.4f} in "
          f"{seconds:.1f} s ({summary['epochs_run']} {unit}s); MLflow run {run.info.run_id}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    def check_model(cfg: config.Config) -> None:
        from pipeline.support import estimators

        estimators.check_params(cfg.model)

    def body(cfg: config.Config) -> None:
        train(cfg, Outputs(), "dvc")

    return stage_main("train", "Fit the configured model; open the pipeline's MLflow run.", argv,
                      body, precheck=check_model)


if __name__ == "__main__":
    sys.exit(main())
