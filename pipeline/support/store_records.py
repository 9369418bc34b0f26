"""Whether the current MLflow store holds the run and version that models/ records name.

The records (models/run.json, models/registration.json) are not DVC outputs: they belong to one
store. After a switch of store ($MLFLOW_TRACKING_URI set to the team server, mlflow.db moved
away), DVC finds every stage up to date while the store has never seen the run; `make train`
asks here which stage to redo in the current store, and the summary reports nothing this check
has not found there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.support import config, tracking
from pipeline.support.outputs import Outputs


@dataclass(frozen=True)
class Missing:
    """What the store lacks, and the first stage that records it there again."""

    stage: str  # "train", "evaluate" or "register"
    reason: str

    @property
    def command(self) -> str:
        """Redo that stage and the ones after it, whatever DVC thinks is up to date."""
        return f"dvc repro --force --downstream {self.stage}"


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def check(cfg: config.MlflowConfig, out: Outputs, client: Any, uri: str) -> Missing | None:
    """None when the store holds the recorded run, evaluated, and its registered version.

    `client` is an MlflowClient of the current store (`uri`, for the messages); errors other
    than "not found" (a server that fails) propagate.
    """
    from mlflow.exceptions import MlflowException

    if not out.run.is_file():  # a clone whose outputs came from `make pull`: no run of its own
        return Missing("train", f"no MLflow run recorded in {out.run}")
    run_id = tracking.read_run_file(out.run)["run_id"]
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        return Missing("train", f"the MLflow store {uri} has no run {run_id} ({out.run}; was "
                                "the store switched or moved?)")
    if cfg.promotion.metric not in run.data.metrics:
        return Missing("evaluate", f"MLflow run {run_id} has no {cfg.promotion.metric} in {uri}")
    try:
        registration = json.loads(out.registration.read_text())
        version = str(registration["candidate"]["version"])
        recorded_run = registration.get("run_id")
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return Missing("register", f"{out.registration} is missing or unreadable")
    if recorded_run != run_id:
        return Missing("register", f"{out.registration} is about run {recorded_run}, not the "
                                   f"current run {run_id}")
    try:
        registered = client.get_model_version(cfg.registered_model, version)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        registered = None
    if registered is None or registered.run_id != run_id:
        return Missing("register", f"{cfg.registered_model} version {version} of run {run_id} "
                                   f"is not in the registry of {uri}")
    return None


def champion_now(cfg: config.MlflowConfig, client: Any) -> str | None:
    """The version the `champion` alias points at in the current store, or None."""
    from mlflow.exceptions import MlflowException

    from pipeline.support.store import CHAMPION

    try:
        return str(client.get_model_version_by_alias(cfg.registered_model, CHAMPION).version)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
        return None
