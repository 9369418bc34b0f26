"""Open the MLflow UI on the project's tracking store (`make ui`).

Usage: python -m pipeline.commands.ui [--port 5000] [--params params.yaml]

An embedded store (sqlite) gets a local `mlflow ui` on 127.0.0.1; a tracking server already has
its UI, so its address is printed instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipeline.support import config, store
from pipeline.support.workspace import child_env, venv_tool


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
        print(f"ui: error: {exc}", file=sys.stderr)
        return 1
    uri = store.tracking_uri(cfg.mlflow)
    if not store.is_local(uri):
        print(f"ui: the tracking store is the server {uri}: open it in a browser "
              f"(experiment {cfg.mlflow.experiment!r}, model {cfg.mlflow.registered_model!r})")
        return 0
    print(f"ui: http://{args.host}:{args.port} on {uri} (Ctrl-C stops it)", flush=True)
    command = [venv_tool("mlflow"), "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    os.execve(command[0], command, child_env())


if __name__ == "__main__":
    sys.exit(main())
