"""Open the MLflow UI on the project's tracking store (`make ui`).

Usage: python -m pipeline.commands.ui [--port 5000] [--params params.yaml]

An embedded store (sqlite) gets a local `mlflow ui` on 127.0.0.1 with one web worker; a tracking
server already has its UI, so its address is printed instead, and whether it asks for a login.
Either way the direct links come first: the experiment's training runs and the champion's model
version (the experiment is tagged as model training, `store.declare_training`, so MLflow 3 opens
it on its runs rather than on GenAI pages). A port that is taken is refused before any link is
printed: the links would lead to whatever listens there.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import urllib.error
import urllib.request
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
    store.declare_training(experiment)  # an experiment made before the tag existed
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


def port_taken(host: str, port: int) -> str | None:
    """Why `mlflow ui` could not listen on host:port (taken, not allowed), or None."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As uvicorn binds: SO_REUSEADDR passes a closed connection's TIME_WAIT, not a listener.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return ("another process listens there" if exc.errno == errno.EADDRINUSE
                    else exc.strerror or str(exc))
    return None


def login_needed(uri: str) -> bool:
    """Whether the tracking server answers an anonymous request with 401: its UI asks the
    browser for a user and password (MLflow's basic-auth app, team mode)."""
    request = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    try:
        with store.open_url(request, store.PREFLIGHT_TIMEOUT):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False


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
    local = store.is_local(uri)
    taken = port_taken(args.host, args.port) if local else None
    if taken:
        print(f"ui: error: cannot serve the UI on {args.host}:{args.port} ({taken}): stop that "
              f"process or choose another port, e.g. `make ui UI_PORT={args.port + 1}`",
              file=sys.stderr)
        return 1
    tracking.fail_killed_runs(cfg.mlflow.experiment)  # no run of a dead process shown RUNNING
    base = f"http://{args.host}:{args.port}" if local else uri.rstrip("/")
    for line in links(base, cfg):
        print(f"ui: {line}")
    if not local:
        print(f"ui: the tracking store is the server {uri}: open the links above in a browser")
        if login_needed(uri):
            user = os.environ.get(store.USERNAME_ENV)
            who = f"user {user!r}" if user else f"your user ({store.USERNAME_ENV})"
            print(f"ui: the server asks for a login: {who} and its password "
                  f"({store.PASSWORD_ENV}; team mode: in team.env)")
        return 0
    print(f"ui: http://{args.host}:{args.port} on {uri} (Ctrl-C stops it)", flush=True)
    # One web worker: one person browses; MLflow's default of 4 is 16 processes on 2 cores.
    command = [venv_tool("mlflow"), "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    os.execve(command[0], command, child_env())


if __name__ == "__main__":
    sys.exit(main())
