"""Which errors a command reports as one line, and which it lets through as a bug.

A user's own mistake is one `<command>: error: ...` line and exit code 1: a `PipelineError`
(bad configuration or input, a missing run or model file), an `OSError` (a disk that refuses a
write; its message names the path), a tracking store that is down (`StoreUnavailable` is a
`ConnectionError`) or that refuses a change (`MlflowException`). Anything else is a bug and shows
its traceback. `FMNIST_DEBUG=1` in the environment, or `--debug`, prints the traceback of an
expected error too, above its line.
"""

from __future__ import annotations

import os
import sys
import traceback

from pipeline.core.errors import PipelineError

DEBUG_ENV = "FMNIST_DEBUG"
DEBUG_HELP = f"show the traceback of an expected error too (or set {DEBUG_ENV}=1)"

# OSError covers the store's StoreUnavailable (a ConnectionError); this module imports no more
# than the core, so that the stages that never talk to MLflow can use it.
_EXPECTED: tuple[type[BaseException], ...] = (PipelineError, OSError)
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"


def expected() -> tuple[type[BaseException], ...]:
    """What a command reports as one line (MLflow's own error once MLflow is loaded: it cannot
    be raised before)."""
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is None:
        return _EXPECTED
    return (*_EXPECTED, mlflow_exceptions.MlflowException)


def explain(exc: BaseException) -> str:
    """The message of an expected error, with MLflow's own wording where there is one."""
    message = getattr(exc, "message", None)
    store = sys.modules.get("pipeline.support.store")  # loaded by every command that tracks
    lost = store.server_fault(exc) if store is not None else None
    if lost is not None:
        return lost
    if getattr(exc, "error_code", None) == "PERMISSION_DENIED" or (
            isinstance(message, str) and "error code 403 " in message):
        user = os.environ.get(USERNAME_ENV, "")
        return (f"the MLflow tracking server refused user {user!r} this change (HTTP 403: "
                f"{message}); writing runs and moving the champion need EDIT permission: ask "
                f"its admin (`make team-user NAME={user or '<you>'} PERMISSION=EDIT`)")
    return f"{type(exc).__name__}: {message}" if isinstance(message, str) else str(exc)


def debugging(flag: bool = False) -> bool:
    """`--debug` given, or FMNIST_DEBUG set to anything but empty or 0."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def show_traceback(exc: BaseException, debug: bool = False) -> None:
    """The traceback of an expected error on stderr, when debugging; nothing otherwise."""
    if debugging(debug):
        traceback.print_exception(exc, file=sys.stderr)


def report(prog: str, exc: BaseException, debug: bool = False, message: str | None = None) -> None:
    """`<prog>: error: <message>` on stderr (by default `explain(exc)`), under its traceback when
    debugging."""
    show_traceback(exc, debug)
    print(f"{prog}: error: {explain(exc) if message is None else message}", file=sys.stderr)
