"""`make ui`: the direct links to the experiment's training runs and to the champion's version,
then a real `mlflow ui` on 127.0.0.1; against a tracking server, the same links on its address,
and whether it asks for a login. A port that is taken is refused before any link."""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.repo_copy import BIN, MAKE, MODEL_NAME, Repo
from tests.test_predict import trained_repo
from tests.test_serve import _free_port, _stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return trained_repo(tmp_path_factory)


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer on {url} after {timeout:.0f} s")


def _group_members(group: int) -> list[str]:
    """The command lines of the live processes of process group `group`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == group and fields[0] != "Z":
                members.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                               .decode(errors="replace").strip())
        except (OSError, ValueError, IndexError):
            continue
    return members


def test_ui_prints_the_runs_page_and_the_champion_then_serves_them(repo: Repo) -> None:
    client = repo.client()
    experiment = client.get_experiment_by_name("fashion-mnist").experiment_id
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion").version
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.commands.ui", "--port", str(port)], cwd=repo.root,
        env={k: v for k, v in repo.env.items() if k != "MLFLOW_TRACKING_URI"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[0].split() == ["ui:", "training", "runs",
                                    f"{base}/#/experiments/{experiment}/runs"]
        assert lines[1].split()[:4] == ["ui:", "champion",
                                        f"{base}/#/models/{MODEL_NAME}/versions/{champion}",
                                        "(version"]
        _wait_for(f"{base}/", process)
        # One web worker, in uvicorn's own process: `mlflow ui` defaults to 4, spawned through
        # multiprocessing (16 processes in all, on a 2-core machine).
        members = _group_members(process.pid)
        assert any(" uvicorn " in m and "--workers 1 " in m for m in members), members
        assert not [m for m in members if "multiprocessing" in m], members
        # Against a tracking server (this UI is one), the links use the server's address.
        remote = subprocess.run(
            [sys.executable, "-m", "pipeline.commands.ui"], cwd=repo.root,
            env={**repo.env, "MLFLOW_TRACKING_URI": base}, capture_output=True, text=True,
            timeout=120)
        assert remote.returncode == 0, remote.stderr
        assert f"{base}/#/experiments/{experiment}/runs" in remote.stdout
        assert "login" not in remote.stdout  # this server has no basic auth
        # The experiment opens on its training runs, not on MLflow 3's GenAI pages.
        tags = client.get_experiment(experiment).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert re.search(rf"{base}/#/models/{MODEL_NAME}/versions/{champion}\b", remote.stdout)
    finally:
        _stop(process)


@pytest.mark.parametrize("command", ["ui", "serve"])
@pytest.mark.parametrize("store", ["http://127.0.0.1:9", "damaged"])
def test_a_store_that_is_down_or_damaged_is_one_line(
        command: str, store: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Before, `make ui` printed a traceback for both and `make serve` for a damaged file."""
    import importlib

    from tests.synthetic import REPO_ROOT

    if store == "damaged":
        (tmp_path / "mlflow.db").write_bytes(b"not a database")
        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    main = importlib.import_module(f"pipeline.commands.{command}").main
    code = main(["--params", str(REPO_ROOT / "params.yaml"), "--port", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith(f"{command}: error: ") and len(err.splitlines()) == 1, err
    assert ("cannot reach the MLflow tracking server" in err) or ("is damaged" in err)


def test_a_busy_port_is_refused_before_any_link(repo: Repo) -> None:
    """Before, `make ui` printed links to whatever listened on the port, and exited 0."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = repo.run(*MAKE, "ui", f"UI_PORT={port}", check=False, timeout=120)
    assert result.returncode != 0
    said = [line for line in result.stdout.splitlines() + result.stderr.splitlines()
            if line.startswith("ui:")]
    assert said == [f"ui: error: cannot serve the UI on 127.0.0.1:{port} (another process "
                    f"listens there): stop that process or choose another port, e.g. "
                    f"`make ui UI_PORT={port + 1}`"]


def test_ui_says_when_the_server_asks_for_a_login(repo: Repo, tmp_path: Path) -> None:
    """A real `mlflow server --app-name basic-auth`: its UI asks the browser for a login."""
    ini = tmp_path / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
                   "admin_password = a-long-password-1\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")  # as the team server: one slow hash
    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env={**repo.env, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                           "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{base}/health", server)
        # The first authenticated request sets the server up (seconds on a loaded machine):
        # made here, so that the 5 s check of `make ui` measures the UI, not the warm-up.
        warm_up = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Authorization": "Basic " + base64.b64encode(
                b"admin:a-long-password-1").decode()})
        with urllib.request.urlopen(warm_up, timeout=120):
            pass
        env = {**repo.env, "MLFLOW_TRACKING_URI": base, "MLFLOW_TRACKING_USERNAME": "admin",
               "MLFLOW_TRACKING_PASSWORD": "a-long-password-1"}
        result = subprocess.run([sys.executable, "-m", "pipeline.commands.ui"], cwd=repo.root,
                                env=env, capture_output=True, text=True, timeout=120)
    finally:
        _stop(server)
    assert result.returncode == 0, result.stderr
    assert ("ui: the server asks for a login: user 'admin' and its password "
            "(MLFLOW_TRACKING_PASSWORD; team mode: in team.env)") in result.stdout
    assert "a-long-password-1" not in result.stdout + result.stderr
