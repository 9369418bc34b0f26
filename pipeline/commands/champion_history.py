"""Print the champion ledger: every move of `champion`, oldest first.

Usage: python -m pipeline.commands.champion_history [--json] [--params params.yaml]

The records are the JSON artifacts of the `champion-ledger` run in the project's experiment
(`pipeline.support.champion_ledger`); the MLflow UI shows the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.core.promotion import statistics_line
from pipeline.support import config, errors, store

COLUMNS = ("time", "action", "from", "to", "value (from -> to)", "user", "host", "test", "reason")


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def rows(records: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per record: the move, the metric before and after, who, where, the evidence."""
    found = []
    for record in records:
        values = record.get("values") or {}
        found.append((
            record["time"].replace("T", " ")[:19],
            record["action"],
            f"v{record['from_version']}" if record.get("from_version") else "-",
            f"v{record['to_version']}",
            f"{_value(values.get('from'))} -> {_value(values.get('to'))}",
            str(record.get("user", "?")),
            str(record.get("host", "?")),
            statistics_line(record.get("statistics") or {}),
            str(record.get("reason", "")),
        ))
    return found


def format_table(records: list[dict[str, Any]]) -> str:
    table = [COLUMNS, *rows(records)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                        strict=False))
                     + "  " + row[-1] for row in table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.champion_history",
                                     description="Print every move of `champion`.")
    parser.add_argument("--json", action="store_true", help="the records as JSON lines")
    parser.add_argument("--params", default=config.PARAMS_FILE, help="composed parameter file")
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
        store.connect(cfg.mlflow, experiment=False)
        from mlflow.tracking import MlflowClient

        from pipeline.support import champion_ledger

        client = MlflowClient()
        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        name = cfg.mlflow.registered_model
        records = ([] if experiment is None
                   else champion_ledger.read(client, experiment.experiment_id, name))
    except errors.expected() as exc:
        errors.report("champion-history", exc, args.debug)
        return 1
    if not records:
        print(f"champion-history: no move of `champion` recorded for {name} yet", file=sys.stderr)
        return 0
    if args.json:
        print("\n".join(json.dumps(record, sort_keys=True) for record in records))
    else:
        print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
