"""Whether the current MLflow store holds the run and version that models/ records name.

The records (models/run.json, models/registration.json) are not DVC outputs: they belong to one
store. After a switch of store ($MLFLOW_TRACKING_URI set to the team server, mlflow.db moved
away), DVC finds every stage up to date while the store has never seen the run; `make train`
asks here which stage to redo in the current store, and the summary reports nothing this check
has not found there.

On the embedded sqlite store a few read-only queries answer (`SqliteReader`): importing MLflow
would cost a no-op `make train` about 3 s. A server, or a schema the queries do not fit, is
asked through MLflow's client (`ClientReader`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.support import config, tracking
from pipeline.support.outputs import Outputs
from pipeline.support.store import (
    CHAMPION,
    check_integrity,
    connect,
    local_store_path,
    tracking_uri,
)


@dataclass(frozen=True)
class Missing:
    """What the store lacks, and the first stage that records it there again."""

    stage: str  # "train", "evaluate" or "register"
    reason: str

    @property
    def dvc_args(self) -> tuple[str, ...]:
        """Redo that stage and the ones after it, whatever DVC thinks is up to date."""
        return ("repro", "--force", "--downstream", self.stage)

    @property
    def command(self) -> str:
        return "dvc " + " ".join(self.dvc_args)


class Reader(Protocol):
    def run_metrics(self, run_id: str) -> set[str] | None:
        """The metric keys of a live run; None if the store has no such run (or deleted it)."""

    def version_run(self, model: str, version: str) -> str | None:
        """The run id of a registered model version; None if there is no such version."""

    def alias_version(self, model: str, alias: str) -> str | None:
        """The version an alias points at; None if unset."""


class SqliteReader:
    """Read-only queries on MLflow's sqlite schema; sqlite3.Error if it does not fit."""

    def __init__(self, path: Path):
        self.path = path

    def _rows(self, query: str, *args: str) -> list[tuple]:
        if not self.path.is_file():
            return []  # no store yet: nothing in it
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                                timeout=10)) as db:
            return db.execute(query, args).fetchall()

    def run_metrics(self, run_id: str) -> set[str] | None:
        found = self._rows("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", run_id)
        if not found or found[0][0] == "deleted":
            return None
        return {key for (key,) in self._rows(
            "SELECT key FROM latest_metrics WHERE run_uuid = ?", run_id)}

    def version_run(self, model: str, version: str) -> str | None:
        found = self._rows("SELECT run_id FROM model_versions WHERE name = ? AND version = ? "
                           "AND current_stage != 'Deleted_Internal'", model, version)
        return found[0][0] if found else None

    def alias_version(self, model: str, alias: str) -> str | None:
        found = self._rows("SELECT version FROM registered_model_aliases WHERE name = ? AND "
                           "alias = ?", model, alias)
        return str(found[0][0]) if found else None


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class ClientReader:
    """The same answers through MLflow's client (connected by the caller); errors other than
    "not found" (a server that fails) propagate."""

    def __init__(self, client: Any):
        self.client = client

    def _or_none(self, call: Any, *args: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return call(*args)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            return None

    def run_metrics(self, run_id: str) -> set[str] | None:
        run = self._or_none(self.client.get_run, run_id)
        if run is None or run.info.lifecycle_stage == "deleted":
            return None
        return set(run.data.metrics)

    def version_run(self, model: str, version: str) -> str | None:
        found = self._or_none(self.client.get_model_version, model, version)
        return found.run_id if found is not None else None

    def alias_version(self, model: str, alias: str) -> str | None:
        found = self._or_none(self.client.get_model_version_by_alias, model, alias)
        return str(found.version) if found is not None else None


def open_reader(cfg: config.MlflowConfig) -> tuple[Reader, str]:
    """A reader of the store `cfg` names, and its URI (a server is connected to first)."""
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:"):  # the sqlite store is read without MLflow
        uri = connect(cfg, experiment=False)
    return reader(uri), uri


def reader(uri: str) -> Reader:
    """Direct queries for a local sqlite store (checked like MLflow would), else MLflow's
    client (import and connect first: `store.connect`)."""
    path = local_store_path(uri)
    if uri.startswith("sqlite:") and path is not None:
        check_integrity(uri)
        try:
            fast = SqliteReader(path)
            fast.alias_version("", CHAMPION)  # the schema fits
            fast.run_metrics("")
            fast.version_run("", "")
            return fast
        except sqlite3.Error:
            pass
    from mlflow import MlflowClient

    return ClientReader(MlflowClient(tracking_uri=uri, registry_uri=uri))


def check(cfg: config.MlflowConfig, out: Outputs, store: Reader, uri: str) -> Missing | None:
    """None when the store holds the recorded run, evaluated, and its registered version."""
    if not out.run.is_file():  # a clone whose outputs came from `make pull`: no run of its own
        return Missing("train", f"no MLflow run recorded in {out.run}")
    run_id = tracking.read_run_file(out.run)["run_id"]
    metrics = store.run_metrics(run_id)
    if metrics is None:
        return Missing("train", f"the MLflow store {uri} has no run {run_id} ({out.run}; was "
                                "the store switched or moved?)")
    if cfg.promotion.metric not in metrics:
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
    holder = store.version_run(cfg.registered_model, version)
    # A byte-identical model adds no version: the record names the version, of an earlier
    # run, that already holds these bytes (the register stage compared their digests).
    same_bytes = registration.get("same_bytes_as") is not None
    if holder is None or (holder != run_id and not same_bytes):
        return Missing("register", f"{cfg.registered_model} version {version} of run {run_id} "
                                   f"is not in the registry of {uri}")
    return None


def champion_now(cfg: config.MlflowConfig, store: Reader) -> str | None:
    """The version the `champion` alias points at in the current store, or None."""
    return store.alias_version(cfg.registered_model, CHAMPION)
