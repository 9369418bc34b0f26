"""The command line of the stages that log to MLflow (train, evaluate, register): read
params.yaml, connect, run, report in one line.

A stage's `main` hands its work to `stage_main`; expected errors (bad configuration or input, a
missing run or model file, a store that cannot be reached: `pipeline.support.errors`) become one
`<stage>: error: ...` line and exit code 1, a bug shows its traceback, and SIGTERM marks the
MLflow run FAILED on the way out. Each first closes the runs of killed processes
(`tracking.fail_killed_runs`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from pipeline.support import config, errors, store, tracking


def stage_main(
    name: str, description: str, argv: Sequence[str] | None,
    body: Callable[[config.Config], str | None],
    precheck: Callable[[config.Config], object] | None = None,
) -> int:
    """Parse `--params`, load and check it, run `precheck(cfg)` (before MLflow is imported, so
    a bad value fails in about a second), connect to MLflow, print `body(cfg)`."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{name}",
                                     description=description)
    parser.add_argument("--params", default=config.PARAMS_FILE, help="composed parameter file")
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = parser.parse_args(argv)
    tracking.fail_runs_on_sigterm()
    try:
        cfg = config.load(args.params)
        if precheck is not None:
            precheck(cfg)
        store.connect(cfg.mlflow)
        tracking.fail_killed_runs(cfg.mlflow.experiment)
        message = body(cfg)
    except errors.expected() as exc:
        errors.report(name, exc, args.debug)
        return 1
    if message:
        print(message)
    return 0
