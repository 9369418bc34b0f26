"""The whole stack: `up` starts what is not running, `down` stops what `up` started, `status`.

Order matters: PostgreSQL first (MLflow stores its runs there), then SeaweedFS (MLflow proxies
artifacts to it), then MLflow; `down` goes the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline.support.workspace import CommandError
from pipeline.team import mlflow_server, postgres, seaweedfs, supervisor
from pipeline.team.settings import ADMIN, Stack, env_file_text, secure_state, write_private


def up(stack: Stack, env_file: Path, say: Callable[[str], None] = print) -> None:
    """Start what is not running, wait for each part, write the client settings."""
    bin_dir = postgres.binaries()
    started = time.monotonic()
    secure_state(stack)
    if postgres.is_running(stack, bin_dir):
        say(f"postgres: already running on {stack.client_host}:{stack.ports['postgres']}")
    else:
        if not postgres.is_initialised(stack):
            postgres.init(stack, bin_dir)
        postgres.start(stack, bin_dir)
        say(f"postgres: started on {stack.client_host}:{stack.ports['postgres']} "
            f"({time.monotonic() - started:.1f} s)")
    postgres.bootstrap(stack)
    for server, url in ((seaweedfs, stack.url("s3")), (mlflow_server, stack.url("mlflow"))):
        name = server.NAME
        if supervisor.pid(stack.state, name) is not None and server.ready(stack):
            say(f"{name}: already running at {url}")
            continue
        supervisor.stop_group(stack.state, name)  # a process that no longer answers
        began = time.monotonic()
        server.start(stack)
        supervisor.wait(stack.state, name, lambda server=server: server.ready(stack),
                        server.START_SECONDS)
        say(f"{name}: started at {url} ({time.monotonic() - began:.1f} s)")
    write_private(env_file, env_file_text(stack.client_env()))
    secure_state(stack)  # what the servers created meanwhile (logs, databases, objects)
    say(f"team: ready in {time.monotonic() - started:.1f} s; `. {env_file}` to use it")


def down(stack: Stack, say: Callable[[str], None] = print) -> None:
    """Stop what `up` started: MLflow first (it writes to the others), PostgreSQL last."""
    for name in (mlflow_server.NAME, seaweedfs.NAME):
        say(f"{name}: {'stopped' if supervisor.stop_group(stack.state, name) else 'not running'}")
    try:
        bin_dir = postgres.binaries()
    except CommandError:
        return
    if postgres.is_running(stack, bin_dir):
        postgres.stop(stack, bin_dir)
        say("postgres: stopped")
    else:
        say("postgres: not running")


def status(stack: Stack, say: Callable[[str], None] = print) -> bool:
    """One line per part: running or not, and where. True if everything runs."""
    try:
        pg = postgres.is_running(stack, postgres.binaries())
    except CommandError as exc:
        pg = False
        say(f"postgres: {exc.message}")
    parts = {
        "postgres": (pg, f"{stack.client_host}:{stack.ports['postgres']} "
                         f"(data {postgres.dirs(stack)[0]})"),
        seaweedfs.NAME: (seaweedfs.running(stack),
                         f"S3 API {stack.url('s3')} (data {stack.path('seaweedfs')})"),
        mlflow_server.NAME: (mlflow_server.running(stack),
                             f"{stack.url('mlflow')} (user {ADMIN}; UI in a browser)"),
    }
    for name, (running, where) in parts.items():
        say(f"{name}: {'running' if running else 'stopped'} - {where}")
    return all(running for running, _ in parts.values())
