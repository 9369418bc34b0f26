"""The champion ledger: every move of the alias `champion`, append-only, in the MLflow store.

One run per registered model, named `champion-ledger` in the project's experiment (so it has the
experiment's permissions and every clone of a team sees it), holds one JSON artifact per move
under `ledger/`: the MLflow UI shows them, `make champion-history` prints them as a table. A
record is never rewritten: each is a new file whose name (time and a random suffix) no other
writer can take, so two clones recording at once both keep their record even if the registry
lock (under which the register stage and `rollback` write) were missing.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.support import model_loader, store, tracking
from pipeline.support.store import CHAMPION

RUN_NAME = "champion-ledger"
LEDGER_OF = "fmnist.ledger_of"  # run tag: the registered model whose champion it records
RECORDS = "ledger"
PROMOTION, ROLLBACK = "promotion", "rollback"


def user(tracking_uri: str) -> str:
    """The MLflow user on a tracking server; the OS user otherwise."""
    if not store.is_local(tracking_uri) and os.environ.get(store.USERNAME_ENV):
        return os.environ[store.USERNAME_ENV]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container) and no $USER
        return f"uid {os.getuid()}"


def new_record(action: str, model: str, from_version: str | None, to_version: str,
               metric: str, values: dict[str, float | None], statistics: dict[str, Any],
               reason: str, tracking_uri: str, run_id: str | None = None) -> dict[str, Any]:
    """A ledger record: who moved `champion` from which version to which, when, on what."""
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "action": action,
        "model": model,
        "from_version": from_version,
        "to_version": to_version,
        "user": user(tracking_uri),
        "host": socket.gethostname(),
        "metric": metric,
        "values": values,
        "statistics": statistics,
        "reason": reason,
        "run_id": run_id,
    }


def _filter(model: str) -> str:
    quote = "'" if "'" not in model else '"'
    return f"tags.`{LEDGER_OF}` = {quote}{model}{quote}"


def ledger_run_id(client: Any, experiment_id: str, model: str, create: bool) -> str | None:
    """The ledger run of `model` (the oldest, should two have been made); made if asked."""
    found = client.search_runs([experiment_id], filter_string=_filter(model),
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    if not create:
        return None
    run = client.create_run(experiment_id, run_name=RUN_NAME, tags={
        LEDGER_OF: model,
        tracking.NOTE: f"Every move of the alias `{CHAMPION}` of registered model {model}, one "
                       f"JSON record per move under `{RECORDS}/` (append-only). "
                       "`make champion-history` prints them; `make rollback` moves the alias "
                       "back. Not a training run.",
    })
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def append(client: Any, experiment_id: str, record: dict[str, Any]) -> str:
    """Add `record` as a new artifact of the ledger run; returns its artifact path."""
    run_id = ledger_run_id(client, experiment_id, record["model"], create=True)
    stamp = record["time"].replace("-", "").replace(":", "").replace(".", "")
    name = f"{stamp}-{uuid.uuid4().hex[:8]}.json"
    with tempfile.TemporaryDirectory(prefix="fmnist-ledger-") as folder:
        path = Path(folder) / name
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        client.log_artifact(run_id, str(path), artifact_path=RECORDS)
    return f"{RECORDS}/{name}"


def read(client: Any, experiment_id: str, model: str) -> list[dict[str, Any]]:
    """Every record of `model`'s ledger, oldest first (none if nothing was ever recorded)."""
    run_id = ledger_run_id(client, experiment_id, model, create=False)
    if run_id is None or not client.list_artifacts(run_id, RECORDS):
        return []
    with tempfile.TemporaryDirectory(prefix="fmnist-ledger-") as folder:
        local = model_loader.download_run_files(run_id, RECORDS, folder)
        records = [(path.name, json.loads(path.read_text()))
                   for path in sorted(local.glob("*.json"))]
    return [record for _, record in sorted(records, key=lambda r: (r[1].get("time", ""), r[0]))]


def move_champion(client: Any, experiment_id: str, record: dict[str, Any]) -> None:
    """Move `champion` to record["to_version"], then record the move; if the record cannot be
    written, the alias goes back where it was, so no move is ever unrecorded."""
    model, previous = record["model"], record["from_version"]
    client.set_registered_model_alias(model, CHAMPION, record["to_version"])
    try:
        append(client, experiment_id, record)
    except BaseException:
        if previous is None:
            client.delete_registered_model_alias(model, CHAMPION)
        else:
            client.set_registered_model_alias(model, CHAMPION, previous)
        raise


def record_promotion(client: Any, experiment_id: str, registration: dict[str, Any],
                     tracking_uri: str) -> None:
    """Move `champion` to the candidate of the register stage's `registration` record, and
    record the move."""
    before = registration["champion_before"]
    move_champion(client, experiment_id, new_record(
        PROMOTION, registration["registered_model"], before and before["version"],
        registration["candidate"]["version"], registration["metric"],
        {"from": before and before["value"], "to": registration["candidate"]["value"]},
        registration["statistics"], registration["reason"], tracking_uri,
        registration["run_id"]))


def previous_champion(records: list[dict[str, Any]], current: str) -> str | None:
    """The champion before `current` in the promotion history: rolling back twice goes two
    promotions back (3 -> 2 -> 1), not back and forth. A version that was never promoted
    (made champion by `rollback --version`) goes back to the one it replaced."""
    for record in reversed(records):
        if record["action"] == PROMOTION and record["to_version"] == current:
            return record["from_version"]
    for record in reversed(records):
        if record["to_version"] == current:
            return record["from_version"]
    return None
