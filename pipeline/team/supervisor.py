"""The stack's servers as processes: each in its own process group, found again by a pid file.

A server's group holds its children too (`weed mini` and the MLflow server's workers), so `down`
stops all of it and nothing else; pid files live in `<state>/run/`, logs in `<state>/logs/`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pipeline.core.files import atomic_write_text
from pipeline.support.workspace import CommandError


def log_file(state: Path, name: str) -> Path:
    return state / "logs" / f"{name}.log"


def _pid_file(state: Path, name: str) -> Path:
    return state / "run" / f"{name}.pid"


def unreachable(url: str, timeout: float = 2.0) -> str | None:
    """Why nothing answers at `url`, or None once a server does (whatever its HTTP status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # any HTTP answer (401, 403, 404) means the server is up
    except (urllib.error.URLError, OSError) as exc:
        return str(exc)


def answers(url: str, timeout: float = 2.0) -> bool:
    return unreachable(url, timeout) is None


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def pid(state: Path, name: str) -> int | None:
    """The process group a previous `up` started for `name`, if it still runs."""
    try:
        found = int(_pid_file(state, name).read_text())
        with contextlib.suppress(ChildProcessError):  # reap it if it died as our own child
            os.waitpid(found, os.WNOHANG)
        os.killpg(found, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    return found


def spawn(state: Path, name: str, argv: list[str], env: dict[str, str],
          cwd: Path | None = None) -> None:
    """Start `argv` in its own process group (so `down` stops it and its children).

    Its log is private (600): servers log user names, paths and sometimes request details.
    """
    log = log_file(state, name)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with os.fdopen(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                   cwd=cwd)
    atomic_write_text(_pid_file(state, name), f"{process.pid}\n", mode=0o600)


def wait(state: Path, name: str, ready: Callable[[], bool], seconds: float) -> None:
    """Until `ready()`; CommandError naming the log if the process dies or takes too long."""
    log = log_file(state, name)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        if pid(state, name) is None:
            raise CommandError(name, f"exited while starting; see {log}")
        time.sleep(0.3)
    raise CommandError(name, f"did not answer within {seconds:.0f} s; see {log}")


def stop_group(state: Path, name: str, grace: float = 20.0) -> bool:
    """SIGTERM to the group of `name`, SIGKILL after `grace` seconds; False if none ran."""
    group = pid(state, name)
    if group is None:
        _pid_file(state, name).unlink(missing_ok=True)
        return False
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):  # reap it if it is our own child
            os.waitpid(group, os.WNOHANG)
        time.sleep(0.2)
    else:
        os.killpg(group, signal.SIGKILL)
    _pid_file(state, name).unlink(missing_ok=True)
    return True
