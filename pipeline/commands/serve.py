"""Serve a registered model over HTTP (`make serve`): MLflow's scoring server behind a strict gate.

Usage: python -m pipeline.commands.serve [--model URI] [--port 5001] [--max-body-mb 16]
                                         [--params params.yaml]

The model is the champion of the configured registered model unless --model names another, and
the store is the project's (`pipeline.support.store`). MLflow's own server (`mlflow models serve`)
casts whatever JSON it gets to the signature's uint8, so 0.5 becomes 0 and "7" becomes 7, reads
bodies of any size and echoes the request in its errors. Here the same MLflow app runs behind a
gate that refuses, with a one-line reason under 1 KB: bodies over the size limit (413), anything
but JSON `inputs`/`instances` of integer pixels 0-255 in shape (n, 784) or (n, 28, 28) (400).
The model is checked before it is loaded: an alias is pinned to its version, its MLmodel file must
declare this pipeline's skops model with the `pipeline.support.serving` loader
(`pipeline.support.models.check_model_uri`, the rule predict follows too), and that loader comes
from this checkout, never from code stored with the model; a pickled model is refused with exit
code 3 before a byte of it is deserialised. The server listens on 127.0.0.1 unless --host says
otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.commands import predict
from pipeline.support import config, store

MAX_ERROR_BYTES = 1024
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ServeError(RuntimeError):
    """The model cannot be served: the message names it and says what to do."""


def error_body(status: int, message: str) -> bytes:
    """MLflow's error format, cut to one line and under MAX_ERROR_BYTES."""
    code = {400: "BAD_REQUEST", 413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}.get(
        status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
    line = " ".join(str(message).split())[:MAX_ERROR_BYTES // 2]
    return json.dumps({"error_code": code, "message": line}).encode()


class Gate:
    """ASGI middleware in front of MLflow's scoring app: bounded, strict `/invocations`."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        body, refusal = await self._read(scope, receive)
        if refusal is None:
            body, refusal = self._check(scope, body)
        if refusal is not None:
            await _respond(send, *refusal)
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, _bounded_errors(send))

    async def _read(self, scope: Scope, receive: Receive) -> tuple[bytes, tuple[int, str] | None]:
        limit = self.max_body_bytes
        too_large = (413, f"request body over the server's limit of {limit} bytes "
                          "(--max-body-mb); send fewer images per request")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _check(self, scope: Scope, body: bytes) -> tuple[bytes, tuple[int, str] | None]:
        """The body to pass on (images flattened to (n, 784)), or the refusal."""
        from pipeline.support import serving

        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip()
        if content_type != b"application/json":
            return body, (415, f"content type {content_type.decode(errors='replace')!r}: send "
                               "application/json with {\"inputs\": [[pixel, ...], ...]}")
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return body, (400, f"the body is not valid JSON: {exc}")
        keys = sorted(request) if isinstance(request, dict) else []
        data_keys = [key for key in keys if key in ("inputs", "instances")]
        if len(data_keys) != 1 or set(keys) - {"inputs", "instances", "params"}:
            return body, (400, "expected a JSON object with `inputs` (or `instances`) and "
                               f"optionally `params`, got keys {keys}")
        try:
            # JSON true/false anywhere in the body sends the pixels to the exact type check.
            images = serving.check_pixels(request[data_keys[0]],
                                          may_hold_booleans=b"true" in body or b"false" in body)
            serving.check_top_k(request.get("params"))
        except serving.PixelError as exc:
            return body, (400, str(exc))
        if len(request[data_keys[0]][0]) != serving.N_PIXELS:  # (n, 28, 28): flatten for MLflow
            body = json.dumps({**request, data_keys[0]: images.tolist()}).encode()
        return body, None


async def _respond(send: Send, status: int, message: str) -> None:
    body = error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _bounded_errors(send: Send) -> Send:
    """MLflow's error answers may quote the request or a stack trace: keep their first line."""
    status = 200

    async def bounded(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            if status < 400:
                await send(message)
            return
        if status < 400:
            await send(message)
            return
        try:
            text = json.loads(message.get("body", b"")).get("message", "")
        except (ValueError, AttributeError):
            text = message.get("body", b"").decode(errors="replace")
        await _respond(send, status, text.splitlines()[0] if text else "error")

    return bounded


def load_served_model(uri: str, tracking_uri: str | None = None) -> Any:
    """MLflow's PyFuncModel for `uri`, after checking its MLmodel names our skops model.

    The implementation is built by this checkout's `pipeline.support.serving`: nothing from the
    model's stored code is imported and nothing is unpickled.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.pyfunc import PyFuncModel

    from pipeline.support import models, serving

    try:
        models.check_model_uri(uri, tracking_uri)  # before anything else is downloaded
        local = Path(mlflow.artifacts.download_artifacts(uri))
        meta = Model.load(local / "MLmodel")
    except models.ModelFileError as exc:
        raise ServeError(str(exc)) from None
    except (MlflowException, OSError) as exc:
        raise ServeError(f"{uri}: {getattr(exc, 'message', exc)}") from None
    loader = meta.flavors.get(serving.FLAVOR, {}).get("loader_module")
    if loader != serving.__name__:
        raise ServeError(f"{uri} is not a model this pipeline serves (python_function loader "
                         f"{loader!r}, expected {serving.__name__!r}): retrain it with "
                         "`make train`")
    try:
        implementation = serving._load_pyfunc(str(local))
    except models.ModelFileError as exc:
        raise ServeError(f"{uri}: {exc}") from None
    return PyFuncModel(model_meta=meta, model_impl=implementation)


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
    parser.add_argument("--params", default=config.PARAMS_FILE)
    args = parser.parse_args(argv)
    if args.max_body_mb <= 0:
        parser.error(f"--max-body-mb={args.max_body_mb}: expected a positive number")
    try:
        cfg = config.load(args.params)
    except config.ConfigError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    requested = args.model or store.model_uri(cfg.mlflow)
    try:  # checks the store first (a server answers, a sqlite file is sound), as predict does
        resolved = predict.resolve_model(requested, cfg.mlflow)  # an alias pinned to its version
    except predict.ModelError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return predict.EXIT_MODEL
    try:
        uri = store.connect(cfg.mlflow, experiment=False)  # MLflow's client, for the scoring app
        model = load_served_model(resolved.uri, resolved.tracking_uri)
    except (store.StoreUnavailable, store.StoreError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return predict.EXIT_MODEL
    except ServeError as exc:
        print(f"serve: error: {resolved.explain(str(exc))}", file=sys.stderr)
        return predict.EXIT_MODEL
    model_uri = resolved.description
    import uvicorn
    from mlflow.pyfunc import scoring_server

    print(f"serve: {model_uri} from {uri} on http://{args.host}:{args.port} "
          "(/ping, /invocations)", flush=True)
    app = Gate(scoring_server.init(model), int(args.max_body_mb * 1_000_000))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
