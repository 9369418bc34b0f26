"""The gate in front of MLflow's scoring app: bounded bodies, strict pixels, short errors.

MLflow's own server (`mlflow models serve`) casts whatever JSON it gets to the signature's uint8,
so 0.5 becomes 0 and "7" becomes 7, reads bodies of any size and echoes the request in its
errors. `Gate` wraps the same ASGI app and refuses, with a one-line reason under 1 KB: bodies over
the size limit (413), another method than POST (405), another content type than JSON (415),
JSON nested deeper than any request needs (400, measured on the bytes before the decoder
recurses), anything but JSON `inputs`/`instances` of integer pixels 0-255 in shape (n, 784) or
(n, 28, 28) (400), checked by `pipeline.core.images`, the rule `predict` follows.

Work is bounded: at most `workers` requests are checked and scored at once (the check in the
gate's own threads, off the event loop, so `/ping` and `/health` keep answering), `queue` more
may wait with their body read, and any request beyond those gets 503 with `Retry-After` before a
byte of its body is read. Raw bodies in memory are at most (workers + queue) x the body limit,
and only `workers` of them are being decoded at a time.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.core.idx import N_PIXELS
from pipeline.core.images import PixelError, json_pixels
from pipeline.support.pyfunc_model import check_top_k

MAX_ERROR_BYTES = 1024
# {"inputs": [image, ...]} with 28x28 images is 4 levels deep; params are 2. Python's decoder
# recurses once per level, so a body nested 100,000 deep would end in a RecursionError.
MAX_JSON_DEPTH = 8
_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # a backslash and the byte it escapes
_STRING = re.compile(rb'"[^"]*"')  # once escapes are gone, a string ends at the next quote
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def error_body(status: int, message: str) -> bytes:
    """MLflow's error format, cut to one line and under MAX_ERROR_BYTES."""
    code = {400: "BAD_REQUEST", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE",
            415: "UNSUPPORTED_MEDIA_TYPE", 503: "TEMPORARILY_UNAVAILABLE"}.get(
        status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
    line = " ".join(str(message).split())[:MAX_ERROR_BYTES // 2]
    return json.dumps({"error_code": code, "message": line}).encode()


class Gate:
    """ASGI middleware in front of MLflow's scoring app: bounded, strict `/invocations`."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int,
                 workers: int = 2, queue: int = 4) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"workers={workers}, queue={queue}: expected workers >= 1, queue >= 0")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.workers, self.queue = workers, queue
        self.admitted = 0  # requests past the 503, running or waiting (only the loop touches it)
        self._running = asyncio.Semaphore(workers)
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="gate-check")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await _respond(send, 405, f"{scope.get('method')} /invocations: send POST with "
                                      'JSON {"inputs": [[pixel, ...], ...]}',
                           [(b"allow", b"POST")])
            return
        if self.admitted >= self.workers + self.queue:
            await _respond(send, 503, f"busy: {self.workers} requests running and {self.queue} "
                                      "waiting; retry in a second", [(b"retry-after", b"1")])
            return
        self.admitted += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            self.admitted -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, refusal = await self._read(scope, receive)
        if refusal is not None:
            await _respond(send, *refusal)
            return
        async with self._running:  # MLflow scores in its own thread: both under the bound
            loop = asyncio.get_running_loop()
            body, refusal = await loop.run_in_executor(self._threads, self._check, scope, body)
            if refusal is not None:
                await _respond(send, *refusal)
                return
            await self._score(scope, body, send)

    async def _score(self, scope: Scope, body: bytes, send: Send) -> None:
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
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip()
        if content_type != b"application/json":
            return body, (415, f"content type {content_type.decode(errors='replace')!r}: send "
                               "application/json with {\"inputs\": [[pixel, ...], ...]}")
        depth = json_depth(body)
        if depth > MAX_JSON_DEPTH:
            return body, (400, f"JSON nested {depth} levels deep; a request needs at most "
                               f"{MAX_JSON_DEPTH}: {{\"inputs\": [[pixel, ...], ...]}}")
        try:
            request = json.loads(body)
        except RecursionError:  # not reached past json_depth; kept so no body can give a 500
            return body, (400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        except (ValueError, UnicodeDecodeError) as exc:
            return body, (400, f"the body is not valid JSON: {exc}")
        keys = sorted(request) if isinstance(request, dict) else []
        data_keys = [key for key in keys if key in ("inputs", "instances")]
        if len(data_keys) != 1 or set(keys) - {"inputs", "instances", "params"}:
            return body, (400, "expected a JSON object with `inputs` (or `instances`) and "
                               f"optionally `params`, got keys {keys}")
        try:
            # JSON true/false anywhere in the body sends the pixels to the exact type check.
            images = json_pixels(request[data_keys[0]],
                                 may_hold_booleans=b"true" in body or b"false" in body)
            check_top_k(request.get("params"))
        except PixelError as exc:
            return body, (400, str(exc))
        if len(request[data_keys[0]][0]) != N_PIXELS:  # (n, 28, 28): flatten for MLflow
            body = json.dumps({**request, data_keys[0]: images.tolist()}).encode()
        return body, None


def json_depth(body: bytes) -> int:
    """How deep the body's arrays and objects nest, counted without recursion.

    Escapes go first (so `\\"` does not end a string), then strings (brackets in them do not
    count); what is left is brackets, summed as +1 and -1 in slices of a MB. The decoder reads
    strings the same way, so it never recurses deeper than this count before it finds an error.
    """
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", body)).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for start in range(0, len(brackets), 1 << 20):
        opens = np.frombuffer(brackets, np.uint8, min(1 << 20, len(brackets) - start), start)
        levels = depth + np.cumsum((opens & 4 == 0) * np.int32(2) - 1)  # [{ vs ]}: bit 2
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


async def _respond(send: Send, status: int, message: str,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _bounded_errors(send: Send) -> Send:
    """MLflow's error answers may quote the request or a stack trace: keep their first line.

    An error's body may come in several messages (MLflow's middleware streams it): it is
    gathered, up to MAX_ERROR_BYTES, and answered once, when the last message arrives.
    """
    status = 200
    gathered = b""

    async def bounded(message: dict[str, Any]) -> None:
        nonlocal status, gathered
        if message["type"] == "http.response.start":
            status = message["status"]
            if status < 400:
                await send(message)
            return
        if status < 400:
            await send(message)
            return
        gathered = (gathered + message.get("body", b""))[:MAX_ERROR_BYTES * 64]
        if message.get("more_body", False):
            return
        try:
            text = json.loads(gathered).get("message", "")
        except (ValueError, AttributeError):
            text = gathered.decode(errors="replace")
        await _respond(send, status, text.strip().splitlines()[0] if text.strip() else "error")

    return bounded
