"""Serve a registered model over HTTP with `mlflow models serve` (`make serve`).

Usage: python -m pipeline.commands.serve [--model URI] [--port 5001] [--params params.yaml]

The model is the champion of the configured registered model unless --model names another, and
the store is the project's (`pipeline.support.store`), so renaming the model in conf/ moves this
command with it. The server listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipeline.support import config, store
from pipeline.support.workspace import child_env, venv_tool


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.serve",
                                     description="Serve the champion (or --model) over HTTP.")
    parser.add_argument("--model", default=None,
                        help="models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model "
                             "(default: the champion)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only)")
    parser.add_argument("--params", default=config.PARAMS_FILE)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
    except config.ConfigError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    model = args.model or store.model_uri(cfg.mlflow)
    uri = store.tracking_uri(cfg.mlflow)
    try:
        store.check_server(uri)
    except store.StoreUnavailable as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    print(f"serve: {model} from {uri} on http://{args.host}:{args.port} (/ping, /invocations)",
          flush=True)
    env = {**child_env(), store.TRACKING_URI_ENV: uri,
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    command = [venv_tool("mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
               "-h", args.host, "-p", str(args.port)]
    os.execve(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
