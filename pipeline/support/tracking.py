"""One MLflow run across the stages, and what it records about the code and the data.

The train stage opens the run and writes its id to `models/run.json`; evaluate and register
resume that run, so one pipeline execution is one row in the MLflow UI. Any exception inside
`resume` marks the run FAILED (MLflow's context manager does so) before it propagates.

A process killed outright (SIGKILL, out of memory, a lost machine) cannot close its run, so each
run records the host and process id that own it (`process_tags`), and every tracked stage start
marks the runs whose process is gone as FAILED with `failure_reason=killed`
(`fail_killed_runs`, for any command that starts runs). Commands that start none do it too:
`make train` before `dvc repro` (so a no-op repro closes them as well) and `make ui`; on the
sqlite store `killed_runs_suspected` first asks the database directly, so MLflow is imported only
when a run's process is really gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_write_text
from pipeline.support import config

# What a commit's code is: a run is "dirty" only if these differ from the commit, not because
# DVC rewrote its own outputs (dvc.lock, metrics/) during the pipeline.
SOURCE_PATHS = ("pipeline", "conf", "dvc.yaml", "params.yaml", "pyproject.toml", "uv.lock")


class RunFileError(PipelineError, RuntimeError):
    """`models/run.json` is missing or does not name a usable MLflow run."""


EPOCH_PREFIX = "epoch/"  # the MLflow UI groups these keys as one section: the learning curves


def epoch_metrics(record: dict[str, Any]) -> list[Any]:
    """One epoch of a training history as MLflow Metrics at step=epoch.

    Kept by the caller and logged in one `log_batch` after the fit: a store round trip per
    epoch would be timed as training (a quarter of a 3 s fit on the sqlite store).
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(f"{EPOCH_PREFIX}{key}", float(value), now, record["epoch"])
            for key, value in record.items() if key != "epoch" and value is not None]


NOTE = "mlflow.note.content"  # the run's (and the experiment's) description in the MLflow UI
EXPERIMENT_DESCRIPTION = (
    "Fashion-MNIST classifiers trained by this project's DVC pipeline (`make train`, "
    "`dvc exp run`) and direct Hydra runs. One run per pipeline execution: the parameters are "
    "the model's keys, the split (data.val_size, data.seed) and the promotion rule; the full "
    "configuration is the artifact config/params.yaml; data provenance and the DVC experiment "
    "are tags. Each run's description says what was trained and what came of it.")
# Set by `dvc exp run` for the stages it runs: the experiment's name, the commit it started from.
DVC_EXPERIMENT_ENV = {"DVC_EXP_NAME": "dvc_exp_name",
                      "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev"}


def run_params(cfg: config.Config, model_params: dict[str, Any], target: str) -> dict[str, Any]:
    """The scalars people compare runs by; lists, URLs and checksums stay out (tags, artifact)."""
    return {
        "model._target_": target,
        **{f"model.{key}": value for key, value in model_params.items()},
        "data.val_size": cfg.data.val_size,
        "data.seed": cfg.data.seed,
        "mlflow.promotion.metric": cfg.mlflow.promotion.metric,
        "mlflow.promotion.min_improvement": cfg.mlflow.promotion.min_improvement,
    }


def dvc_experiment_tags(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`dvc_exp_name`, `dvc_exp_baseline_rev` inside `dvc exp run`; nothing otherwise."""
    environ = os.environ if environ is None else environ
    return {tag: environ[name] for name, tag in DVC_EXPERIMENT_ENV.items() if environ.get(name)}


def describe_training(run_name: str, kind: str, n_train: int, n_val: int,
                      experiment: str | None = None) -> str:
    """The run's description while it trains; register adds the outcome."""
    where = f" in DVC experiment `{experiment}`" if experiment else ""
    return (f"**{run_name}**: {kind} trained on {n_train:,} images, validated on {n_val:,}"
            f"{where}.")


def describe_outcome(trained: str, metrics: dict[str, float], metric: str, model: str,
                     version: str, promoted: bool, reason: str) -> str:
    """The description once registered: what was trained, its test scores, the decision, why."""
    scores = ", ".join(f"{key} {metrics[key]:.4f}" for key in
                       ("test_accuracy", "test_f1_macro", "test_log_loss") if key in metrics)
    decision = "promoted to `champion`" if promoted else "not promoted (alias `challenger`)"
    return (f"{trained.splitlines()[0]}\n\nTest set: {scores}.\n\nRegistered as {model} "
            f"version {version}, {decision} on {metric}: {reason}.")


def git_commit(root: Path = Path(".")) -> tuple[str, bool]:
    """The commit the code came from and whether the work tree differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS],
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


def write_run_file(path: str | Path, run_id: str, **extra: Any) -> None:
    atomic_write_text(path, json.dumps({"run_id": run_id, **extra}, indent=2) + "\n")


def read_run_file(path: str | Path) -> dict[str, Any]:
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
def resume(run_id: str, allow_failed: bool = False) -> Iterator[Any]:
    """Reopen the pipeline's run; an exception inside marks it FAILED and propagates.

    A FAILED or KILLED run is refused unless `allow_failed`: evaluate may redo its work on one
    (it rewrites everything it logs), but register never promotes a run that failed.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        status = mlflow.MlflowClient().get_run(run_id).info.status
    except MlflowException as exc:
        raise RunFileError(
            f"MLflow run {run_id} not found in {mlflow.get_tracking_uri()}: {exc.message}. "
            "Was the store changed or moved? Retrain in this store with `make train` "
            "(or `dvc repro --force --downstream train`)."
        ) from None
    if status in ("FAILED", "KILLED") and not allow_failed:
        raise RunFileError(f"MLflow run {run_id} is {status}: rerun `dvc repro` (evaluate redoes "
                           "a failed evaluation), or retrain with `dvc repro -f -s train`")
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tags(process_tags())  # this process owns the run now (`fail_killed_runs`)
        yield run


# MLflow's compare page compares only the files at the top of each run's artifacts, never the
# ones in folders ("No common artifacts"): a copy of the figures people compare goes there.
COMPARED_FIGURES = ("confusion_test.png", "learning_curves.png")


def log_comparable(folder: Path) -> None:
    """Log at the top of the active run the files of `folder` named in COMPARED_FIGURES."""
    import mlflow

    for name in COMPARED_FIGURES:
        if (folder / name).is_file():
            mlflow.log_artifact(str(folder / name))


CHAMPION_TAG = "champion"  # `champion=true` on the run whose version is the champion


def move_champion_tag(client: Any, before: Any, after: Any) -> None:
    """The champion findable in the runs list (a column, a filter `tags.champion = 'true'`):
    the tag goes with the alias, from the previous champion's run (`before`, a model version
    or None) to the new one's (`after`)."""
    from mlflow.exceptions import MlflowException

    if before is not None and before.run_id and before.run_id != after.run_id:
        # its run deleted, or the tag never set (a version registered before the tag existed)
        with contextlib.suppress(MlflowException):
            client.delete_tag(before.run_id, CHAMPION_TAG)
    client.set_tag(after.run_id, CHAMPION_TAG, "true")


KILLED = "killed"


def process_tags() -> dict[str, str]:
    """Who owns a new run: `fail_killed_runs` on the same host checks whether it still lives."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: gone all the same
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def fail_killed_runs(experiment: str) -> list[str]:
    """Mark FAILED (`failure_reason=killed`) the RUNNING runs of this host whose process is gone.

    Only runs tagged by `process_tags` on this host are judged, so it is safe on a tracking
    server that other machines share. Returns the ids of the runs it closed.
    """
    import mlflow

    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host = socket.gethostname().replace("'", "")
    closed = []
    for run in client.search_runs(
            [found.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'"):
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "failure_reason", KILLED)
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    if closed:
        print(f"marked FAILED (killed: process gone): MLflow run {', '.join(closed)}",
              file=sys.stderr)
    return closed


def killed_runs_suspected(tracking_uri: str, experiment: str) -> bool:
    """Whether `fail_killed_runs` may find a run to close: on a sqlite store, whether a RUNNING
    run of `experiment` owned by this host has a process that is gone (one read-only query, no
    MLflow import); any other store, or a schema the query does not fit, may have one."""
    parts = urlsplit(tracking_uri)
    if parts.scheme != "sqlite":
        return True
    database = Path(parts.path[1:])
    if not database.is_file():
        return False  # no store yet: no run
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True,
                                                timeout=10)) as db:
            pids = [value for (value,) in db.execute(
                "SELECT pid.value FROM runs JOIN experiments USING (experiment_id) "
                "JOIN tags AS pid ON pid.run_uuid = runs.run_uuid AND pid.key = 'pid' "
                "JOIN tags AS host ON host.run_uuid = runs.run_uuid AND host.key = 'host' "
                "WHERE runs.status = 'RUNNING' AND experiments.name = ? AND host.value = ?",
                (experiment, socket.gethostname()))]
    except sqlite3.Error:
        return True
    return any(pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
               for pid in pids)


def fail_runs_on_sigterm() -> None:
    """Turn SIGTERM (systemd, CI cancellation, `timeout`) into SystemExit.

    Python's default SIGTERM handling skips `with` blocks, which would leave the MLflow run
    RUNNING for ever; as an exception, MLflow's context manager marks it FAILED on the way out.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# --- A registered version's tags and metrics --------------------------------------------------
# The version page lists tags in one row each: only what a search needs is a tag (at most 12,
# with the promotion's own); the scores are the logged model's metrics (`link_metrics`).
PROVENANCE_TAG_PREFIXES = ("git_", "data_", "split_")


def version_tags(run_id: str, run_tags: dict[str, str], metrics: dict[str, float],
                 metric: str, identity: dict[str, str]) -> dict[str, str]:
    """run id, git commit, data hashes (as the train stage saw them), the model's identity
    (`model_integrity`) and the promotion metric (which `current_champion` reads)."""
    tags = {"run_id": run_id,
            **{key: value for key, value in sorted(run_tags.items())
               if key.startswith(PROVENANCE_TAG_PREFIXES)},
            **identity}
    if metric in metrics:
        tags[metric] = repr(metrics[metric])
    return tags


def link_metrics(client: Any, run_id: str, model_id: str | None,
                 metrics: dict[str, float]) -> None:
    """The run's test and validation scores logged on its model (MLflow 3's `model_id`), so
    the model version page shows them as metrics. One request."""
    if model_id is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[
        Metric(key, float(value), now, 0, model_id=model_id)
        for key, value in sorted(metrics.items()) if key.startswith(("test_", "val_"))])
