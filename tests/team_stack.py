"""The team stack for tests: real PostgreSQL, SeaweedFS and `mlflow server`, started once.

A pytest plugin (see conftest.py): the session fixture `team` runs `python -m
pipeline.commands.team up` on a block of free ports with its state in a fresh folder, and
`down` at the end; every process is stopped by process group. Without PostgreSQL's server
binaries the team tests skip, saying how to install them.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.support.workspace import CommandError
from pipeline.team import postgres, settings
from tests.synthetic import REPO_ROOT


def free_port_block(size: int) -> int:
    """The first of `size` consecutive ports that nothing listens on."""
    for _ in range(200):
        base = random.randrange(20000, 40000)
        try:
            sockets = []
            for port in range(base, base + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free block of ports")


def http_status(url: str, user: str | None = None, password: str | None = None,
                body: dict | None = None) -> int:
    """The HTTP status of a GET (or, with `body`, a JSON POST) to `url`, with basic auth when
    `user` is given: what a client without this project's code would get."""
    import json
    import urllib.error
    import urllib.request
    from base64 import b64encode

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if user is not None:
        token = b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def read_env_file(path: Path) -> dict[str, str]:
    """The variables a shell gets from `. team.env`."""
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = shlex.split(value)[0] if value else ""
    return values


@dataclass
class Team:
    state: Path
    env_file: Path

    @property
    def stack(self) -> settings.Stack:
        return settings.load_stack(self.state)

    @property
    def env(self) -> dict[str, str]:
        return read_env_file(self.env_file)

    def command(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`python -m pipeline.commands.team ...` on this stack."""
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.commands.team", *args, "--state", str(self.state),
             "--env-file", str(self.env_file)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
            env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")})
        if check and result.returncode != 0:
            pytest.fail(f"team {' '.join(args)} exited {result.returncode}\n{result.stdout}\n"
                        f"{result.stderr}")
        return result

    def client_environment(self, base: dict[str, str]) -> dict[str, str]:
        """`base` (a Repo's environment) after `. team.env`."""
        return {**{k: v for k, v in base.items() if not k.startswith("MLFLOW_")},
                "MLFLOW_DISABLE_TELEMETRY": "true", **self.env}


@pytest.fixture(scope="session")
def team() -> Iterator[Team]:
    try:
        postgres.binaries()
    except CommandError as exc:
        pytest.skip(f"team tests need PostgreSQL: {exc.message}")
    # Not under pytest's tmp folder (mode 700): as root, PostgreSQL runs as `postgres`, which
    # must reach its data folder.
    state_root = Path(tempfile.mkdtemp(prefix="fmnist-team-"))
    state_root.chmod(0o755)
    found = Team(state_root / "state", state_root / "team.env")
    base = free_port_block(len(settings.PORT_OFFSETS))
    try:
        found.command("up", "--base-port", str(base))
        yield found
    finally:
        found.command("down", check=False)
        shutil.rmtree(state_root, ignore_errors=True)
