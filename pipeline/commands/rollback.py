"""Move `champion` back: to the previous champion of the ledger, or to a version named.

Usage: python -m pipeline.commands.rollback [--version N] [--reason TEXT] [--params params.yaml]

Runs under the registry lock that the register stage takes (`registry_lock`), so a rollback and
a registration never interleave; the target version's model is loaded and checked before the
alias moves, and the move is recorded in the champion ledger (`make champion-history`). A user
the tracking server does not let move the alias (READ permission) gets one line and exit 1. A
running `make serve` keeps serving the version it loaded: restart it to serve the new champion.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.support import config, errors, store


class RollbackError(PipelineError, ValueError):
    """No version to roll back to, or not one that can be champion; the message says which."""


def verify_version(name: str, version: str, mlflow_cfg: config.MlflowConfig) -> None:
    """The target's bytes must be the ones registered (the SHA-256 recorded at registration)
    and load as a model this pipeline trusts (skops, trusted types) before it becomes champion:
    loading a registered version checks both, and says once if it has no digest to check."""
    from pipeline.support import model_loader

    model_loader.load_model(f"models:/{name}/{version}", mlflow_cfg)


def _metric_value(client: Any, version: Any, metric: str) -> float | None:
    value = client.get_run(version.run_id).data.metrics.get(metric) if version.run_id else None
    return float(value) if value is not None else None


def rollback(cfg: config.Config, version: str | None, reason: str | None) -> str:
    """Move the alias; returns the line to print."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.stages.register import _announce_wait, current_champion, registry_lock
    from pipeline.support import champion_ledger

    uri = store.connect(cfg.mlflow, experiment=False)
    client = MlflowClient()
    name, metric = cfg.mlflow.registered_model, cfg.mlflow.promotion.metric
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        raise RollbackError(f"no experiment {cfg.mlflow.experiment!r} in {store.redact_url(uri)}:"
                            " nothing was ever registered; run `make train`")
    with registry_lock(uri, on_wait=_announce_wait):
        champion, _ = current_champion(client, name, metric)
        if champion is None:
            raise RollbackError(f"registered model {name} has no champion to roll back")
        current = str(champion.version)
        records = champion_ledger.read(client, experiment.experiment_id, name)
        target = version or champion_ledger.previous_champion(records, current)
        if target is None:
            raise RollbackError(
                f"the champion ledger of {name} names no champion before version {current}: "
                "name one (`make rollback VERSION=N`)")
        if target == current:
            raise RollbackError(f"version {target} of {name} is already the champion")
        try:
            chosen = client.get_model_version(name, target)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise RollbackError(f"registered model {name} has no version {target!r}") from None
        verify_version(name, target, cfg.mlflow)
        why = reason or "rollback (no reason given)"
        champion_ledger.move_champion(client, experiment.experiment_id, champion_ledger.new_record(
            champion_ledger.ROLLBACK, name, current, target, metric,
            {"from": _metric_value(client, champion, metric),
             "to": _metric_value(client, chosen, metric)}, {}, why, uri))
    return (f"rollback: champion of {name} moved from version {current} to version {target} "
            f"({why}); restart a running `make serve` to serve it")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.rollback",
                                     description="Move `champion` back to an earlier version.")
    parser.add_argument("--version", help="the version to make champion (default: the champion "
                                          "before the current one, from the ledger)")
    parser.add_argument("--reason", help="why, recorded in the champion ledger")
    parser.add_argument("--params", default=config.PARAMS_FILE, help="composed parameter file")
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = parser.parse_args(argv)
    if args.version is not None and not args.version.isdigit():
        print(f"rollback: error: VERSION={args.version!r} is invalid: expected a version number",
              file=sys.stderr)
        return 2
    try:
        print(rollback(config.load(args.params), args.version, args.reason))
    except errors.expected() as exc:
        errors.report("rollback", exc, args.debug)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
