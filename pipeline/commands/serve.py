"""Serve a registered model over HTTP (`make serve`): MLflow's scoring server behind a strict gate.

Usage: python -m pipeline.commands.serve [--model URI] [--port 5001] [--max-body-mb 16]
                                         [--workers 2] [--queue 4] [--params params.yaml]

The model is the champion of the configured registered model unless --model names another, and
the store is the project's (`pipeline.support.store`). MLflow's own server (`mlflow models serve`)
casts whatever JSON it gets to the signature's uint8, so 0.5 becomes 0 and "7" becomes 7, reads
bodies of any size and echoes the request in its errors. Here the same MLflow app runs behind a
gate (`pipeline.support.http_gate`) that refuses, with a one-line reason under 1 KB: bodies over
the size limit (413), anything but JSON `inputs`/`instances` of integer pixels 0-255 in shape
(n, 784) or (n, 28, 28) (400). The model is checked before it is loaded, by
`pipeline.support.model_loader` as for predict: an alias is pinned to its version, its MLmodel
file must declare this pipeline's skops model with the pipeline's pyfunc loader, and that loader
comes from this checkout, never from code stored with the model; a pickled model is refused with
exit code 3 before a byte of it is deserialised. The server listens on 127.0.0.1 unless --host
says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.support import config, model_loader, store
from pipeline.support.http_gate import Gate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.serve",
                                     description="Serve the champion (or --model) over HTTP.")
    parser.add_argument("--model", default=None,
                        help="models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model "
                             "(default: the champion)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only)")
    parser.add_argument("--max-body-mb", type=float, default=16.0,
                        help="largest request body accepted, in MB (default 16: about 4,000 "
                             "images); larger ones get HTTP 413")
    parser.add_argument("--workers", type=int, default=2,
                        help="requests checked and scored at once (default 2)")
    parser.add_argument("--queue", type=int, default=4,
                        help="requests that may wait for a worker (default 4); beyond them "
                             "HTTP 503 with Retry-After. Peak memory grows with the body limit "
                             "times workers + queue")
    parser.add_argument("--params", default=config.PARAMS_FILE)
    args = parser.parse_args(argv)
    if args.max_body_mb <= 0:
        parser.error(f"--max-body-mb={args.max_body_mb}: expected a positive number")
    if args.workers < 1 or args.queue < 0:
        parser.error(f"--workers={args.workers} --queue={args.queue}: expected at least one "
                     "worker and a queue of 0 or more")
    try:
        cfg = config.load(args.params)
    except config.ConfigError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    requested = args.model or store.model_uri(cfg.mlflow)
    try:  # checks the store first (a server answers, a sqlite file is sound), as predict does;
        # an alias is pinned to its version
        resolved = model_loader.resolve_model(requested, cfg.mlflow)
    except model_loader.ModelError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return model_loader.EXIT_MODEL
    try:
        uri = store.connect(cfg.mlflow, experiment=False)  # MLflow's client, for the scoring app
        model = model_loader.load_served(resolved)  # a registered version's bytes checked
    except (store.StoreUnavailable, store.StoreError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return model_loader.EXIT_MODEL
    except model_loader.ServeError as exc:
        print(f"serve: error: {resolved.explain(str(exc))}", file=sys.stderr)
        return model_loader.EXIT_MODEL
    model_uri = resolved.description
    model_names = model.metadata.flavors.get("python_function", {}).get("class_names")
    if model_names and model_names != list(cfg.data.class_names):  # the model's names are served
        print(f"serve: warning: data.class_names in {args.params} differ from the names "
              f"{model_uri} was trained with; serving the model's: {', '.join(model_names)}",
              file=sys.stderr, flush=True)
    import uvicorn
    from mlflow.pyfunc import scoring_server

    print(f"serve: {model_uri} from {uri} on http://{args.host}:{args.port} "
          "(/ping, /invocations)", flush=True)
    app = Gate(scoring_server.init(model), int(args.max_body_mb * 1_000_000),
               workers=args.workers, queue=args.queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
