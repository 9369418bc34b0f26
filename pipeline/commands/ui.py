"""Open the MLflow UI on the project's tracking store (`make ui`).

Usage: python -m pipeline.commands.ui [--port 5000] [--params params.yaml]

An embedded store (sqlite) gets a local `mlflow ui` on 127.0.0.1; a tracking server already has
its UI, so its address is printed instead. Either way the direct links come first: MLflow 3 opens
on its GenAI overview, and the experiment's training runs and the champion's model version are
several clicks away from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from urllib.parse import quote

from pipeline.support import config, errors, store, tracking
from pipeline.support.workspace import child_env, venv_tool


def links(base: str, cfg: config.Config) -> list[str]:
    """The training-runs page of the experiment and the champion's model-version page."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return [f"no experiment {cfg.mlflow.experiment!r} yet: run `make train` first"]
    lines = [f"training runs     {base}/#/experiments/{experiment.experiment_id}/runs"]
    name = cfg.mlflow.registered_model
    try:
        champion = client.get_model_version_by_alias(name, store.CHAMPION)
    except MlflowException:
        lines.append(f"champion          none yet in {name!r}")
    else:
        lines.append(f"champion          {base}/#/models/{quote(name)}/versions/{champion.version}"
                     f" (version {champion.version})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.ui",
                                     description="Open the MLflow UI on the project's store.")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only)")
    parser.add_argument("--params", default=config.PARAMS_FILE)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
    except config.ConfigError as exc:
        errors.show_traceback(exc)
        print(f"ui: error: {exc}", file=sys.stderr)
        return 1
    try:
        uri = store.connect(cfg.mlflow, experiment=False)
    except (store.StoreUnavailable, store.StoreError) as exc:
        errors.show_traceback(exc)
        print(f"ui: error: {exc}", file=sys.stderr)
        return 1
    tracking.fail_killed_runs(cfg.mlflow.experiment)  # no run of a dead process shown RUNNING
    local = store.is_local(uri)
    base = f"http://{args.host}:{args.port}" if local else uri.rstrip("/")
    for line in links(base, cfg):
        print(f"ui: {line}")
    if not local:
        print(f"ui: the tracking store is the server {uri}: open the links above in a browser")
        return 0
    print(f"ui: http://{args.host}:{args.port} on {uri} (Ctrl-C stops it)", flush=True)
    # One web worker: one person browses; MLflow's default of 4 is 16 processes on 2 cores.
    command = [venv_tool("mlflow"), "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    os.execve(command[0], command, child_env())


if __name__ == "__main__":
    sys.exit(main())
