"""`make runs`: the recent training runs of the project's store as a table in the terminal.

Usage: python -m pipeline.commands.runs [--limit 15] [--trials] [--params params.yaml]

One line per run, newest first: when, the run name (its main parameters, what differs first),
validation and test accuracy, the registered version, and `*` on the champion, as the alias
`champion` points now. Optuna trials and the tune parent runs are left out unless --trials.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pipeline.support import config, errors, store, store_records

TRAINING_RUNS = "tags.`mlflow.parentRunId` IS NULL and tags.model != 'study'"
WIDTH = {"started": 11, "run": 30, "status": 8, "val acc": 7, "test acc": 8, "version": 7,
         "id": 8}


def _accuracy(run: Any, key: str) -> str:
    value = run.data.metrics.get(key)
    return f"{value:.4f}" if value is not None else "-"


def rows(runs: list[Any], champion: str | None) -> list[dict[str, str]]:
    table = []
    for run in runs:
        version = run.data.tags.get("registered_version", "")
        is_champion = bool(version) and version == champion
        name = run.info.run_name or ""
        table.append({
            "started": datetime.fromtimestamp(run.info.start_time / 1000).strftime("%m-%d %H:%M"),
            "run": name if len(name) <= WIDTH["run"] else name[:WIDTH["run"] - 1] + "~",
            "status": run.info.status.lower(),
            "val acc": _accuracy(run, "val_accuracy"),
            "test acc": _accuracy(run, "test_accuracy"),
            "version": (f"{version} *" if is_champion else version) or "-",
            "id": run.info.run_id[:8],
        })
    return table


def format_table(table: list[dict[str, str]]) -> str:
    header = "  ".join(f"{key:<{width}}" for key, width in WIDTH.items()).rstrip()
    lines = [header, "-" * len(header)]
    lines += ["  ".join(f"{row[key]:<{width}}" for key, width in WIDTH.items()).rstrip()
              for row in table]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.runs",
                                     description="List the recent training runs.")
    parser.add_argument("--limit", type=int, default=15, help="how many runs (default 15)")
    parser.add_argument("--trials", action="store_true",
                        help="include Optuna trials and the tune parent runs")
    parser.add_argument("--params", default=config.PARAMS_FILE)
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        cfg = config.load(args.params).mlflow
        uri = store.connect(cfg, experiment=False)
        from mlflow import MlflowClient

        client = MlflowClient()
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            print(f"runs: no experiment {cfg.experiment!r} in {uri} yet: run `make train`",
                  file=sys.stderr)
            return 1
        found = client.search_runs([experiment.experiment_id],
                                   filter_string="" if args.trials else TRAINING_RUNS,
                                   order_by=["attributes.start_time DESC"],
                                   max_results=args.limit)
        champion = store_records.champion_now(cfg, store_records.ClientReader(client))
    except errors.expected() as exc:
        errors.report("runs", exc)
        return 1
    print(format_table(rows(list(found), champion)))
    print(f"{len(found)} most recent runs of {cfg.experiment!r} in {store.redact_url(uri)}; "
          f"* = champion ({cfg.registered_model} version {champion or 'none yet'}); "
          "`make ui` shows them all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
