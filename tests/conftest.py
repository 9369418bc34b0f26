"""Shared fixtures: synthetic archives, a project directory with its params.yaml, HTTP mirrors."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.support.config import FileSpec
from tests.synthetic import data_params, write_archives, write_params

MIRROR_ENV = "FMNIST_MIRROR"
pytest_plugins = ["tests.team_stack"]  # the `team` fixture: a real team stack, started once


@pytest.fixture(autouse=True)
def _no_mirror_from_the_environment(request: pytest.FixtureRequest,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither a developer's FMNIST_MIRROR nor ../shared/fashion-mnist may leak into tests that
    use synthetic archives: set but empty, the variable turns the local mirror off."""
    if request.node.get_closest_marker("real_data") is None:
        monkeypatch.setenv(MIRROR_ENV, "")


MLFLOW_EXPERIMENT_ENV = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(autouse=True)
def _no_experiment_leaked_to_subprocesses() -> Iterator[None]:
    """`mlflow.set_experiment` (store.connect, in-process tests and fixtures) exports
    MLFLOW_EXPERIMENT_ID to os.environ, so every process a later test starts would look for that
    experiment in its own, different store ("experiment id 1 does not exist"): each test starts
    and ends without it (found in a random order, seed 2714833904)."""
    for name in MLFLOW_EXPERIMENT_ENV:
        os.environ.pop(name, None)
    yield
    for name in MLFLOW_EXPERIMENT_ENV:
        os.environ.pop(name, None)


@dataclass
class Archives:
    """Synthetic archives in a read-only-by-convention directory: copy before changing."""

    directory: Path
    specs: dict[str, FileSpec]

    def bytes_of(self, key: str) -> bytes:
        return (self.directory / self.specs[key].name).read_bytes()


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Archives:
    directory = tmp_path_factory.mktemp("synthetic-mirror")
    return Archives(directory, write_archives(directory, n_train_per_class=50,
                                              n_test_per_class=10, seed=0))


@dataclass
class Project:
    """A working directory with data/{raw,extra,split} and a params.yaml pointing at them."""

    root: Path
    params: Path
    archives: Archives

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def extra_dir(self) -> Path:
        return self.root / "data" / "extra"

    @property
    def split_dir(self) -> Path:
        return self.root / "data" / "split"

    def configure(self, files: dict[str, FileSpec] | None = None, **data_overrides) -> Path:
        """(Re)write params.yaml: the archives' specs unless `files`, with these overrides."""
        specs = files if files is not None else self.archives.specs
        write_params(self.params, data_params(specs, self.root, **data_overrides))
        return self.params

    def fill_raw(self) -> None:
        """Put the archives in the raw directory, as the download stage would."""
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.archives.specs.values():
            shutil.copyfile(self.archives.directory / spec.name, self.raw_dir / spec.name)


@pytest.fixture
def project(tmp_path: Path, archives: Archives) -> Project:
    project = Project(tmp_path / "project", tmp_path / "project" / "params.yaml", archives)
    project.root.mkdir()
    project.configure(mirrors=[str(archives.directory)])
    return project


# --- A real HTTP server on 127.0.0.1 -------------------------------------------------------


@dataclass
class Route:
    """How the test server answers GET /<name>.

    mode: "ok" (body as is), "drop" (announce `len(body) + missing` bytes, send the body, then
    close), "reset" (send half of the body, then reset the connection), "stall" (wait `delay`
    seconds before answering), or "status" (answer `status` with no body).
    """

    body: bytes = b""
    mode: str = "ok"
    status: int = 200
    missing: int = 1000
    delay: float = 0.0


@dataclass
class Mirror:
    server: http.server.ThreadingHTTPServer
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def count(self, name: str) -> int:
        return self.requests.count(name)


def _handler_for(mirror_ref: list[Mirror]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            mirror = mirror_ref[0]
            name = self.path.lstrip("/")
            mirror.requests.append(name)
            route = mirror.routes.get(name)
            if route is None:
                self.send_error(404, "Not Found")
                return
            if route.mode == "status":
                self.send_error(route.status)
                return
            if route.mode == "stall":
                time.sleep(route.delay)
            body = route.body
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            extra = route.missing if route.mode == "drop" else 0
            self.send_header("Content-Length", str(len(body) + extra))
            self.end_headers()
            if route.mode == "reset":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                # SO_LINGER with a zero timeout turns close() into a TCP reset.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
                return
            self.wfile.write(body)
            self.close_connection = True

    return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that gave up early
        pass


@pytest.fixture
def http_mirror() -> Iterator:
    """Factory: `http_mirror({name: Route | bytes})` starts a server on an ephemeral port."""
    started: list[Mirror] = []

    def start(routes: dict[str, Route | bytes]) -> Mirror:
        ref: list[Mirror] = []
        server = _QuietServer(("127.0.0.1", 0), _handler_for(ref))
        mirror = Mirror(server, {
            name: route if isinstance(route, Route) else Route(route)
            for name, route in routes.items()
        })
        ref.append(mirror)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        started.append(mirror)
        return mirror

    yield start
    for mirror in started:
        mirror.server.shutdown()
        mirror.server.server_close()
