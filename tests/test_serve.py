"""Serving the champion over HTTP, as `make serve` does: `mlflow models serve` on 127.0.0.1.

The server runs against the MLflow store of a repository copy after `dvc repro` (shared with
tests/test_predict.py), in its own process group, which teardown kills and checks is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.support import models
from tests.repo_copy import BIN, MODEL_NAME, Repo
from tests.test_predict import trained_repo

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(process: subprocess.Popen) -> None:
    """TERM the whole group (mlflow and its uvicorn child), then KILL whatever is left."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(process.pid):
            break
        os.killpg(process.pid, sig)
        deadline = time.monotonic() + grace
        while _group_alive(process.pid) and time.monotonic() < deadline:
            process.poll()  # reap the leader, else it lingers as a zombie in the group
            time.sleep(0.2)
    process.wait(timeout=5)
    assert not _group_alive(process.pid), "serving processes survived SIGKILL"


def _request(url: str, body: dict | None = None) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return trained_repo(tmp_path_factory)


@pytest.fixture(scope="module")
def server(repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**repo.env, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=repo.root, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited {process.returncode}:\n"
                            f"{log_path.read_text()[-3000:]}")
            try:
                if _request(f"{url}/ping")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/ping after {STARTUP_TIMEOUT:.0f} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


def _test_images(root: Path) -> np.ndarray:
    with np.load(root / "data" / "split" / "test.npz") as test:
        return test["X"][::17]


def test_ping(server: str) -> None:
    assert _request(f"{server}/ping")[0] == 200


def test_invocations_answer_what_the_champion_predicts(repo: Repo, server: str) -> None:
    registration = repo.json("models/registration.json")
    assert registration["champion_after"]["run_id"] == repo.json("models/run.json")["run_id"]
    champion = models.load(repo.root / "models" / "model.skops")  # that run's model file
    X = _test_images(repo.root)

    status, answer = _request(f"{server}/invocations", {"inputs": X.tolist()})

    assert status == 200, answer
    assert answer == {"predictions": champion.predict(X).tolist()}
    assert len(set(answer["predictions"])) > 1


def test_invocations_refuse_input_that_breaks_the_signature(server: str) -> None:
    status, answer = _request(f"{server}/invocations", {"inputs": [[0] * 783]})
    assert status == 400
    assert "does not match expected shape (-1, 784)" in answer["message"]
    status, answer = _request(f"{server}/invocations", {"inputs": [[300] * 784]})
    assert status == 400 and "out of bounds for uint8" in answer["message"]
