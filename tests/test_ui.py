"""`make ui`: the direct links to the experiment's training runs and to the champion's version,
then a real `mlflow ui` on 127.0.0.1; against a tracking server, the same links on its address."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.repo_copy import MODEL_NAME, Repo
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
