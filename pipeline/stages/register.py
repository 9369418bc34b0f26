"""Stage `register`: register the run's model; move `champion` to it only if it is better.

Usage: python -m pipeline.stages.register [--params params.yaml]

Every successful run becomes a version of the registered model, tagged with its model digest
(`model_integrity`: every load checks it), git commit, data version and run id, with its scores
logged on the model and its model card (`model_card`) as description; a model whose digest a
version already holds is not registered again (the record names that version). The version
gets the alias `champion` if and only if it beats the current champion on the promotion metric
(test set, fixed across runs) by at least `mlflow.promotion.min_improvement`, significantly on
the same test images (the promotion gate, `pipeline.support.promotion_gate`; docs/champion.md);
otherwise it gets `challenger` and the reason as a tag. Every move of `champion` is recorded in
the champion ledger.

Promotion is a compare-and-set: read the champion, decide, move the alias. MLflow has no atomic
"move the alias only if it still points at version N", so two registrations that interleave
(both read champion v1, the worse one writes last) could leave a worse champion. Hence the whole
read-decide-move runs under one lock that every registering process shares:
- with $FMNIST_REGISTRY_LOCK_URL set (team mode: `team.env` sets it), a PostgreSQL session-level
  advisory lock (`pg_advisory_lock`) on a database that exists for that purpose, reached by a
  role that can do nothing else. It is shared by every machine that talks to the team's server,
  and the database server releases it when the holder's connection ends, so a registration that
  crashes or loses its network never blocks the others;
- otherwise (the embedded sqlite store, one machine) an flock next to the store.
Inside the lock the champion is re-read, so each registration compares itself with the champion
left by the previous one; the alias only ever moves to a better version, and `predict`, reading
the alias at any moment, never sees a worse champion than one it saw before. (Two machines
registering against one server with no lock URL would share no lock: team.env always sets one.)
A registration that finds the lock busy says so on stderr (`register: waiting for the registry
lock held by ...`) and waits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_write
from pipeline.support import (
    champion_ledger,
    config,
    model_card,
    model_integrity,
    model_loader,
    promotion_gate,
    store,
    tracking,
)
from pipeline.support.locks import advisory_lock, exclusive_lock
from pipeline.support.outputs import Outputs
from pipeline.support.registration_file import describe, registration_from_record
from pipeline.support.stage import stage_main
from pipeline.support.store import CHALLENGER, CHAMPION

REGISTRY_LOCK_URL_ENV = "FMNIST_REGISTRY_LOCK_URL"
REGISTRY_LOCK_TIMEOUT_ENV = "FMNIST_REGISTRY_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 120.0


class RegistrationError(PipelineError, ValueError):
    """The run cannot be registered (no model, no metric); the registry is left as it was."""


def _lock_path(tracking_uri: str) -> Path:
    """Next to a local sqlite store; otherwise one lock per registry in the temp folder."""
    local = store.local_store_path(tracking_uri)
    if local is not None:
        return local.with_name(local.name + ".register.lock")
    digest = hashlib.sha256(_registry_identity(tracking_uri).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fashion-mnist-register-{digest}.lock"


def _registry_identity(tracking_uri: str) -> str:
    """What names the registry whatever the URL's spelling (127.0.0.1, localhost, a trailing
    slash): the creation time, to the millisecond, of the Default experiment (id 0) that the
    server made in its own database. Two databases never share it; every client reads it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        created = MlflowClient(tracking_uri=tracking_uri).get_experiment("0").creation_time
    except MlflowException:
        created = None
    if created is None:  # no Default experiment: the URL, in one spelling
        parts = urlsplit(tracking_uri)
        host = "127.0.0.1" if parts.hostname in ("localhost", "::1") else parts.hostname
        return f"url {parts.scheme}://{host}:{parts.port}{parts.path.rstrip('/')}"
    return f"mlflow registry created {created}"


def registry_lock(
    tracking_uri: str, on_wait: Callable[[str], None] | None = None
) -> AbstractContextManager[None]:
    """The registry's lock: PostgreSQL's advisory lock at $FMNIST_REGISTRY_LOCK_URL when set,
    else a file lock for this store (see `pipeline.support.locks`). The wait is bounded by
    $FMNIST_REGISTRY_LOCK_TIMEOUT seconds (default 120): past it, one line names the holder."""
    raw = os.environ.get(REGISTRY_LOCK_TIMEOUT_ENV, "").strip()
    try:
        timeout = float(raw) if raw else DEFAULT_LOCK_TIMEOUT
        if not timeout > 0:
            raise ValueError
    except ValueError:
        raise RegistrationError(f"{REGISTRY_LOCK_TIMEOUT_ENV}={raw!r}: expected a number of "
                                "seconds greater than 0") from None
    shared = os.environ.get(REGISTRY_LOCK_URL_ENV)
    if shared:
        name = ("register " + (_registry_identity(tracking_uri)
                               if store.local_store_path(tracking_uri) is None
                               else tracking_uri))
        return advisory_lock(shared, name, on_wait=on_wait, timeout=timeout)
    return exclusive_lock(_lock_path(tracking_uri), on_wait=on_wait, timeout=timeout)


def _announce_wait(holder: str) -> None:
    print(f"register: waiting for the registry lock held by {holder} ...",
          file=sys.stderr, flush=True)


def _version_summary(version: Any, metric: str, value: float | None) -> dict[str, Any] | None:
    if version is None:
        return None
    return {"version": str(version.version), "value": value, "run_id": version.run_id}


def current_champion(client: Any, name: str, metric: str) -> tuple[Any, float | None]:
    """The current champion version and its promotion metric, or (None, None)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # MLflow answers a missing alias with INVALID_PARAMETER_VALUE. Anything else (a broken
        # store) must not be mistaken for "no champion", which would promote any candidate.
        if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            raise
        return None, None
    value = version.tags.get(metric)
    if value is None:  # registered by something else: read the metric from its run
        value = client.get_run(version.run_id).data.metrics.get(metric)
    return version, float(value) if value is not None else None


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="Softmax regression on Fashion-MNIST; the alias `champion` "
                "marks the best version on the promotion metric.")
        except MlflowException as exc:  # created meanwhile by a concurrent pipeline
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def run(cfg: config.Config, out: Outputs, run_id: str, model_uri: str) -> dict[str, Any]:
    """Register the run's model, apply the promotion rule, and record the decision."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = cfg.mlflow.registered_model
    rule = cfg.mlflow.promotion
    with tracking.resume(run_id):
        mlflow_run = client.get_run(run_id)
        run_data = mlflow_run.data
        if rule.metric not in run_data.metrics:
            raise RegistrationError(
                f"run {run_id} has no metric {rule.metric!r} (mlflow.promotion.metric); "
                "run the evaluate stage first")
        candidate_value = float(run_data.metrics[rule.metric])
        # The bytes the store holds, which every load checks against (model_integrity).
        digest = model_loader.logged_model_digest(model_uri)
        model_integrity.check_evaluated(out.model, digest)
        same_bytes_as, created = None, False
        with registry_lock(store.tracking_uri(cfg.mlflow), on_wait=_announce_wait):
            _ensure_registered_model(client, name)
            existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
            holder = None if existing else model_integrity.version_holding(client, name, digest)
            if existing:
                version = existing[0]
            elif holder is not None:  # a byte-identical model: no second version
                version, same_bytes_as = holder, str(holder.version)
            else:
                # The version carries what the run was made from, as the train stage saw it.
                tags = tracking.version_tags(run_id, run_data.tags, run_data.metrics,
                                             rule.metric, model_integrity.identity_tags(digest))
                # A tracking server accepts a logged model (`models:/m-...`) as the source only
                # with its id; the embedded store does not mind either way.
                model_id = (model_uri.removeprefix("models:/")
                            if model_uri.startswith("models:/m-") else None)
                version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                                      model_id=model_id)
                tracking.link_metrics(client, run_id, model_id, run_data.metrics)
                created = True
            champion, champion_value = current_champion(client, name, rule.metric)
            champion_before = _version_summary(champion, rule.metric, champion_value)
            if champion is not None and champion.version == version.version:
                promote, alias, reason, statistics = True, None, "already the champion", {}
            else:
                decision = promotion_gate.judge(client, rule, run_id, candidate_value,
                                                champion, champion_value)
                promote, reason, statistics = (decision.promote, decision.reason,
                                               decision.statistics)
                alias = CHAMPION if promote else CHALLENGER
            # Everything that can fail comes before the alias moves: a run that fails here
            # is FAILED and has changed no alias.
            client.set_model_version_tag(name, version.version, "promotion_decision",
                                         "promoted" if promote else "kept champion")
            client.set_model_version_tag(name, version.version, "promotion_reason", reason)
            if created:  # the card of a version, its description and an artifact of its run
                card = model_card.card_for_run(cfg, out, mlflow_run, str(version.version),
                                               digest, promote, reason)
                client.update_model_version(name, version.version, description=card)
                mlflow.log_text(card, model_card.ARTIFACT)
            mlflow.set_tags({
                "registered_model": name,
                "registered_version": str(version.version),
                "promoted": str(promote).lower(),
                "promotion_reason": reason,
                tracking.NOTE: tracking.describe_outcome(
                    run_data.tags.get(tracking.NOTE) or mlflow_run.info.run_name,
                    run_data.metrics, rule.metric, name, str(version.version), promote, reason),
            })
            after = version if promote else champion
            record = {
                "run_id": run_id,
                "registered_model": name,
                "metric": rule.metric,
                "candidate": {"version": str(version.version), "value": candidate_value},
                "champion_before": champion_before,
                "champion_after": _version_summary(
                    after, rule.metric, candidate_value if promote else champion_value),
                "promoted": promote,
                "reason": reason,
                "model_sha256": digest,
                "same_bytes_as": same_bytes_as,
                "statistics": statistics,
            }
            with atomic_write(out.registration) as handle:  # makes the folder if need be
                handle.write((json.dumps(record, indent=2) + "\n").encode())
                if alias == CHAMPION:  # recorded in the champion ledger, or not moved
                    champion_ledger.record_promotion(client, mlflow_run.info.experiment_id,
                                                     record, store.tracking_uri(cfg.mlflow))
                elif alias is not None:
                    client.set_registered_model_alias(name, alias, version.version)
            if promote:
                tracking.move_champion_tag(client, champion, version)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    def register(cfg: config.Config) -> str:
        run_file = tracking.read_run_file(Outputs().run)
        record = run(cfg, Outputs(), run_file["run_id"], run_file["model_uri"])
        return f"register: {describe(registration_from_record(record), changed=True)}"

    return stage_main("register", "Register the model; promote it if better.", argv, register)


if __name__ == "__main__":
    sys.exit(main())
