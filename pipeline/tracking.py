"""MLflow plumbing shared by the stages: which store, one run across stages, which data version.

The train stage opens the run and writes its id to `models/run.json`; evaluate and register
resume that run, so one pipeline execution is one row in the MLflow UI. Any exception inside
`resume` marks the run FAILED (MLflow's context manager does so) before it propagates.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from pipeline import config
from pipeline.core.files import atomic_write_text

# Before mlflow is imported: no network calls, no progress bars in DVC's logs.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

RUN_FILE = "models/run.json"


class RunFileError(RuntimeError):
    """`models/run.json` is missing or does not name a usable MLflow run."""


def connect(cfg: config.MlflowConfig) -> str:
    """Point MLflow at the configured store ($MLFLOW_TRACKING_URI wins); quiet its INFO logs."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # uv's virtualenvs have no pip; MLflow warns about it on every logged model.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
    uri = cfg.resolved_tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.experiment)
    return uri


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'model': {'lr': 0.1}} -> {'model.lr': 0.1}: stable parameter names for comparing runs."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def git_commit(root: Path = Path(".")) -> tuple[str, bool]:
    """The commit the code came from and whether the work tree differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(dirty)


def data_version(data: config.DataConfig, root: Path = Path(".")) -> dict[str, str]:
    """DVC's hashes of the raw archives and the extra images, plus the split manifest's hash.

    Read from dvc.lock and data.dvc as plain YAML: importing DVC would double a stage's start-up.
    """
    from pipeline.core.files import md5sum

    version: dict[str, str] = {}
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("download", {}).get("outs", []):
            if out.get("path") == data.raw_dir:
                version["data_raw_md5"] = out.get("md5", "")
    tracked = root / "data.dvc"
    if tracked.is_file():
        for out in (yaml.safe_load(tracked.read_text()) or {}).get("outs", []):
            if out.get("path") == data.extra_dir:
                version["data_extra_md5"] = out.get("md5", "")
    manifest = root / data.split_dir / "manifest.json"
    if manifest.is_file():
        version["split_manifest_md5"] = md5sum(manifest)
    return version


def write_run_file(run_id: str, path: str | Path = RUN_FILE, **extra: Any) -> None:
    atomic_write_text(path, json.dumps({"run_id": run_id, **extra}, indent=2) + "\n")


def read_run_file(path: str | Path = RUN_FILE) -> dict[str, Any]:
    path = Path(path)
    try:
        info = json.loads(path.read_text())
        info["run_id"]  # noqa: B018 - the one key every reader needs
    except FileNotFoundError:
        raise RunFileError(f"{path} not found: run the train stage first (`dvc repro`)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RunFileError(f"{path} has no run_id; rerun the train stage") from None
    return info


@contextmanager
def resume(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Reopen the pipeline's run; refuse a failed one so it never reaches the registry."""
    try:
        status = MlflowClient().get_run(run_id).info.status
    except mlflow.exceptions.MlflowException as exc:
        raise RunFileError(
            f"MLflow run {run_id} not found in {mlflow.get_tracking_uri()}: {exc.message}; "
            "was the store changed or deleted? Rerun the pipeline with `dvc repro -f train`."
        ) from None
    if status in ("FAILED", "KILLED"):
        raise RunFileError(f"MLflow run {run_id} is {status}; rerun with `dvc repro -f train`")
    with mlflow.start_run(run_id=run_id) as run:
        yield run
