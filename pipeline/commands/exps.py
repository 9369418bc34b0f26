"""`make exps`: DVC's experiments table with the columns that matter, in 120 columns.

Usage: python -m pipeline.commands.exps [DVC_EXP_SHOW_ARGS ...]   (e.g. -A, -n 5, --rev main)

`dvc exp show` has a column per parameter, metric and dependency hash (hundreds). This keeps the
model (its MLflow run name: what was trained, with its main knobs), validation and test accuracy,
training time, and the MLflow run, found by the tags the train stage sets (`dvc_exp_name` inside
`dvc exp run`, `git_commit` for a commit, models/run.json for the workspace). The training time
is the run's `train_seconds` metric, else the one of metrics/train.json if it has one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.support import config, errors
from pipeline.support.workspace import CommandError, child_env, find_repo_root, venv_tool

WIDTH = 120
HEADERS = ("Experiment", "Created", "Model", "val", "test", "secs", "MLflow run")
# Widest cell per column (accuracies, training seconds); names are cut with "…" past theirs.
WIDTHS = (16, 11, 30, 6, 6, 6, 32)


class ExpsError(PipelineError):
    """`dvc exp show` failed; the message has DVC's own words."""


@dataclass(frozen=True)
class Row:
    name: str
    rev: str
    created: str
    params: dict[str, Any]
    metrics: dict[str, Any]


def _data(node: dict[str, Any], kind: str, file: str) -> dict[str, Any]:
    return (((node.get("data") or {}).get(kind) or {}).get(file) or {}).get("data") or {}


def _row(node: dict[str, Any], name: str, depth: int) -> Row:
    data = node.get("data") or {}
    stamp = (data.get("timestamp") or "")[5:16].replace("T", " ")
    metrics = {**_data(node, "metrics", "metrics/train.json"),
               **{f"{split}.accuracy": (values or {}).get("accuracy")
                  for split, values in _data(node, "metrics", "metrics/evaluate.json").items()}}
    return Row(("  " * depth) + name, node.get("rev", ""), stamp,
               _data(node, "params", "params.yaml"), metrics)


def rows(shown: list[dict[str, Any]]) -> Iterator[Row]:
    """Workspace, each baseline commit, then its experiments, in `dvc exp show`'s order."""
    for node in shown:
        rev = node.get("rev", "")
        yield _row(node, node.get("name") or (rev if rev == "workspace" else rev[:7]), 0)
        for experiment in node.get("experiments") or []:
            for revision in (experiment.get("revs") or [])[:1]:
                yield _row(revision, revision.get("name") or revision.get("rev", "")[:7], 1)


def _model(params: dict[str, Any]) -> str:
    from pipeline.support.estimators import KINDS, ModelSpec

    model = dict(params.get("model") or {})
    target = model.pop("_target_", None)
    if target not in KINDS:
        return "-"
    try:
        return ModelSpec(target, model).run_name
    except (KeyError, TypeError, ValueError):
        return KINDS[target].name


def find_runs(rows_: Sequence[Row], params: Path) -> dict[str, Any]:
    """Row name -> its MLflow run in the current store; {} (and one line) if it is unreachable.

    A commit or experiment gets a run only if the run's test accuracy is the one DVC shows: the
    committed metrics may come from another machine's run.
    """
    from pipeline.support import store, tracking

    try:
        cfg = config.load(params)
        store.connect(cfg.mlflow, experiment=False)
        import mlflow

        experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        runs = [] if experiment is None else mlflow.MlflowClient().search_runs(
            [experiment.experiment_id], "tags.source = 'dvc'", max_results=1000,
            order_by=["attributes.start_time DESC"])
    except (PipelineError, OSError) as exc:
        print(f"exps: no MLflow run ids: {exc}", file=sys.stderr)
        return {}
    by_experiment: dict[str, list[Any]] = {}
    by_commit: dict[str, list[Any]] = {}
    for run in runs:  # newest first
        tags = run.data.tags
        if tags.get("dvc_exp_name"):
            by_experiment.setdefault(tags["dvc_exp_name"], []).append(run)
        elif tags.get("git_dirty") == "false" and tags.get("git_commit"):
            by_commit.setdefault(tags["git_commit"], []).append(run)
    known = {run.info.run_id: run for run in runs}

    def same_scores(candidates: list[Any], row: Row) -> Any | None:
        shown = row.metrics.get("test.accuracy")
        for run in candidates:
            logged = run.data.metrics.get("test_accuracy")
            if isinstance(shown, int | float) and logged is not None and abs(logged - shown) < 1e-9:
                return run
        return None

    found: dict[str, Any] = {}
    for row in rows_:
        name = row.name.strip()
        if row.rev == "workspace":
            try:
                run_id = tracking.read_run_file(Path(params).parent / "models" / "run.json")
            except PipelineError:
                continue
            if run_id["run_id"] in known:
                found[name] = known[run_id["run_id"]]
        elif run := same_scores(by_experiment.get(name, []) or by_commit.get(row.rev, []), row):
            found[name] = run
    return found


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(rows_: Sequence[Row], runs: dict[str, Any]) -> str:
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(HEADERS, WIDTHS, strict=True)).rstrip()]
    for row in rows_:
        run = runs.get(row.name.strip())
        seconds = run.data.metrics.get("train_seconds") if run is not None else None
        cells = (_cut(row.name, WIDTHS[0]), row.created or "-", _cut(_model(row.params), WIDTHS[2]),
                 _number(row.metrics.get("val.accuracy"), 4),
                 _number(row.metrics.get("test.accuracy"), 4),
                 _number(row.metrics.get("train_seconds") if seconds is None else seconds, 1),
                 run.info.run_id if run is not None else "-")
        lines.append("  ".join(f"{c:<{w}}" for c, w in zip(cells, WIDTHS, strict=True)).rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    try:
        root = find_repo_root(Path.cwd())
        result = subprocess.run([venv_tool("dvc"), "exp", "show", "--json", *args], cwd=root,
                                env=child_env(), capture_output=True, text=True)
        if result.returncode != 0:
            raise ExpsError(f"`dvc exp show` failed (exit code {result.returncode}): "
                            f"{(result.stderr or result.stdout).strip()}")
        shown = list(rows(json.loads(result.stdout or "[]")))
    except (ExpsError, CommandError, OSError, json.JSONDecodeError) as exc:
        errors.show_traceback(exc)
        print(f"exps: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(shown, find_runs(shown, root / config.PARAMS_FILE)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
