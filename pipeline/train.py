"""Stage `train`: fit the configured model and open the pipeline's MLflow run.

Two ways in, one code path:

- From DVC (`dvc repro`, `make train`): dvc.yaml runs this module with
  `--config-dir . --config-name params`, so the configuration is exactly the params.yaml that DVC
  records. It writes the DVC outputs at the project root and leaves evaluation and registration
  to their own stages, which resume the same MLflow run.
- From Hydra directly (`python -m pipeline.train model.lr=0.05`, or a sweep with `-m`): conf/ is
  composed with the overrides, and train, evaluate and register run in one process, writing into
  Hydra's output directory, so every point of a sweep is one complete MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import config, tracking
from pipeline.core.files import atomic_write_text
from pipeline.core.split import check_manifest, load_split
from pipeline.outputs import Outputs

# scikit-learn, pandas, matplotlib and MLflow are imported where used: a bad configuration is
# reported in about a second instead of after several seconds of imports.



def run_name(model: config.SoftmaxConfig | config.LogRegConfig) -> str:
    """Readable in the MLflow UI's run list: what was trained, with its main knobs."""
    if isinstance(model, config.SoftmaxConfig):
        return f"softmax-{model.optimizer}-lr{model.lr:g}-ep{model.epochs}-bs{model.batch_size}"
    return f"logreg-C{model.C:g}-it{model.max_iter}"


def pip_requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference starts a subprocess and costs seconds per model."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}"
            for package in ("mlflow", "scikit-learn", "skops", "numpy", "threadpoolctl")]


def _fit(estimator: Any, cfg: config.Config, X, y, X_val, y_val) -> list[dict[str, Any]]:
    """Train with a live progress bar and per-epoch MLflow step metrics; returns the history."""
    import mlflow
    from tqdm import tqdm

    if not isinstance(cfg.model, config.SoftmaxConfig):
        print(f"train: fitting {run_name(cfg.model)} (lbfgs shows no per-epoch progress)")
        started = time.perf_counter()
        estimator.fit(X, y)
        record: dict[str, Any] = {"epoch": int(np.max(estimator[-1].n_iter_))}
        for split, (features, labels) in {"train": (X, y), "val": (X_val, y_val)}.items():
            proba = estimator.predict_proba(features)
            record[f"{split}_loss"] = float(-np.mean(np.log(
                np.clip(proba[np.arange(len(labels)), labels], 1e-15, None))))
            record[f"{split}_accuracy"] = float(np.mean(proba.argmax(axis=1) == labels))
        record.update(lr=None, seconds=time.perf_counter() - started)
        return [record]

    bar = tqdm(total=cfg.model.epochs, desc="train", unit="epoch", file=sys.stderr)

    def on_epoch(record: dict[str, Any]) -> None:
        # "epoch/..." keys: the MLflow UI groups them as one section of learning curves.
        mlflow.log_metrics(
            {f"epoch/{key}": value for key, value in record.items()
             if key != "epoch" and value is not None},
            step=record["epoch"],
        )
        shown = {"loss": record["train_loss"], "val_acc": record["val_accuracy"]}
        bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items() if v is not None})
        bar.update(1)

    with bar:
        estimator.fit(X, y, eval_set=(X_val, y_val), callback=on_epoch)
    return [dict(row) for row in estimator.history_]


def train(cfg: config.Config, out: Outputs, source: str, overrides: list[str]) -> dict[str, Any]:
    """Fit, record everything in a new MLflow run, write the DVC outputs; returns the run file."""
    import mlflow
    import mlflow.data
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline import figures, models
    from pipeline.core.estimator import HISTORY_KEYS

    X, y = load_split(cfg.data.split_dir, "train")
    X_val, y_val = load_split(cfg.data.split_dir, "val")
    estimator = models.build(cfg.model)
    resolved = dataclasses.asdict(cfg)
    commit, dirty = tracking.git_commit()
    data_version = tracking.data_version(cfg.data)
    tags = {
        "model": cfg.model.name,
        "source": source,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        **data_version,
    }
    if overrides:
        tags["hydra_overrides"] = " ".join(overrides)

    with mlflow.start_run(run_name=run_name(cfg.model), tags=tags) as run:
        mlflow.log_params(tracking.flatten(resolved))
        mlflow.log_dict(resolved, "config/params.yaml")
        digest = data_version.get("split_manifest_md5")
        for split, features, labels in (("train", X, y), ("validation", X_val, y_val)):
            dataset = mlflow.data.from_numpy(
                features, targets=labels, name=f"fashion-mnist-{split}",
                source=str(Path(cfg.data.split_dir).resolve()), digest=digest)
            mlflow.log_input(dataset, context="training" if split == "train" else split)

        started = time.perf_counter()
        history = _fit(estimator, cfg, X, y, X_val, y_val)
        seconds = time.perf_counter() - started
        final = history[-1] if isinstance(cfg.model, config.LogRegConfig) else next(
            row for row in history if row["epoch"] == estimator.best_epoch_)
        summary = {
            "train_seconds": seconds,
            "epochs_run": len(history) if isinstance(cfg.model, config.SoftmaxConfig)
            else final["epoch"],
            "best_epoch": final["epoch"],
            **{key: final[key] for key in ("train_loss", "train_accuracy", "val_loss",
                                           "val_accuracy")},
        }
        # val_* come from the evaluate stage, measured on the final model.
        mlflow.log_metrics({key: float(value) for key, value in summary.items()
                            if not key.startswith("val_")})

        atomic_write_text(out.history,
                          pd.DataFrame(history, columns=list(HISTORY_KEYS)).to_csv(index=False))
        atomic_write_text(out.train_metrics, json.dumps(summary, indent=2) + "\n")
        curves = figures.learning_curves_figure(history)
        figures.save(curves, out.learning_curves)
        figures.close(curves)
        for path in (out.learning_curves, out.history):
            mlflow.log_artifact(str(path), artifact_path="training")

        models.save(estimator, out.model)
        info = mlflow.sklearn.log_model(
            estimator,
            name="model",
            serialization_format="skops",
            skops_trusted_types=models.TRUSTED_TYPES,
            signature=infer_signature(X[:5], estimator.predict(X[:5])),
            input_example=X[:2],
            pip_requirements=pip_requirements(),
            code_paths=[str(Path(__file__).parent)],
        )
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                  "run_name": run.info.run_name, "model_uri": info.model_uri}
        tracking.write_run_file(out.run, **record)
    print(f"train: {run.info.run_name}: val_accuracy {summary['val_accuracy']:.4f} in "
          f"{seconds:.1f} s ({summary['epochs_run']} epochs); MLflow run {run.info.run_id}")
    return record


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(raw: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    from_dvc = hydra_cfg.job.config_name == "params"
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    tracking.fail_runs_on_sigterm()
    try:
        try:
            cfg = config.validate(OmegaConf.to_container(raw, resolve=True))
        except config.ConfigError as exc:
            where = "params.yaml" if from_dvc else "conf/ with your overrides"
            raise config.ConfigError(f"{where}: {exc}") from None
        check_manifest(cfg.data.split_dir, cfg.data.val_size, cfg.data.seed,
                       {key: spec.md5 for key, spec in cfg.data.files.items()})
        tracking.connect(cfg.mlflow)
        if from_dvc:
            train(cfg, Outputs(), "dvc", overrides=[])
            return None
        from pipeline import evaluate, register

        out = Outputs(Path(hydra_cfg.runtime.output_dir))
        record = train(cfg, out, "hydra", list(hydra_cfg.overrides.task))
        results = evaluate.run(cfg, out, record["run_id"])
        register.run(cfg, out, record["run_id"], record["model_uri"])
    except tracking.expected_errors() as exc:
        print(f"train: error: {tracking.explain(exc)}", file=sys.stderr)
        if sweeping:  # this point's run is FAILED; the other points of the sweep still run
            return None
        sys.exit(1)
    from pipeline.summary import format_summary

    print(format_summary(out))
    return results["test"][cfg.mlflow.promotion.metric.removeprefix("test_")]


if __name__ == "__main__":
    main()
