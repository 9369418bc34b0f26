"""Serving the champion over HTTP: `make serve` (MLflow's scoring app behind the strict gate) and
plain `mlflow models serve` on the same registered model, both real processes on 127.0.0.1.

The servers run against the MLflow store of a repository copy after `dvc repro` (shared with
tests/test_predict.py), each in its own process group, which teardown kills and checks is gone.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.support import model_loader
from tests.repo_copy import BIN, MODEL_NAME, Repo
from tests.test_predict import trained_repo

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 90.0
SERVER_LOGS: dict[str, Path] = {}  # url -> the server's stdout and stderr


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


def _start(command: list[str], repo: Repo, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start a server in its own process group; returns it and its URL once /ping answers."""
    env = {**repo.env, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    port = _free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command],
            cwd=repo.root, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[:3]} exited {process.returncode}:\n"
                            f"{log_path.read_text()[-3000:]}")
            try:
                if _request(f"{url}/ping")[0] == 200:
                    SERVER_LOGS[url] = log_path
                    return process, url
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/ping after {STARTUP_TIMEOUT:.0f} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    except BaseException:  # pytest.fail, a read timeout, Ctrl-C: the server goes too
        _stop(process)
        raise


@pytest.fixture(scope="module")
def server(repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make serve`: the champion behind the strict gate, with a 1 MB body limit."""
    process, url = _start(
        [str(BIN / "python"), "-m", "pipeline.commands.serve", "--port", "{port}",
         "--max-body-mb", "1"],
        repo, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def mlflow_server(repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Plain `mlflow models serve` on the registered champion: the pyfunc flavor as logged."""
    process, url = _start(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", "{port}"],
        repo, tmp_path_factory.mktemp("mlflow-serve") / "serve.log")
    try:
        yield url
    finally:
        _stop(process)


def _test_images(root: Path) -> np.ndarray:
    with np.load(root / "data" / "split" / "test.npz") as test:
        return test["X"][::17]


def test_ping(server: str) -> None:
    assert _request(f"{server}/ping")[0] == 200


CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]


def _expected(repo: Repo, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    registration = repo.json("models/registration.json")
    assert registration["champion_after"]["run_id"] == repo.json("models/run.json")["run_id"]
    champion = model_loader.load(repo.root / "models" / "model.skops")  # that run's model file
    return champion.predict(X), champion.predict_proba(X)


@pytest.mark.parametrize("which", ["make serve", "mlflow models serve"])
def test_invocations_answer_class_names_and_probabilities(repo: Repo, server: str,
                                                          mlflow_server: str, which: str) -> None:
    url = server if which == "make serve" else mlflow_server
    X = _test_images(repo.root)
    labels, proba = _expected(repo, X)

    status, answer = _request(f"{url}/invocations", {"inputs": X.tolist()})

    assert status == 200, answer
    rows = answer["predictions"]
    assert [row["class"] for row in rows] == labels.tolist()
    assert [row["class_name"] for row in rows] == [CLASS_NAMES[label] for label in labels]
    assert np.allclose([row["probability"] for row in rows], proba.max(axis=1))
    assert set(rows[0]) == {"class", "class_name", "probability"}
    assert len(set(labels)) > 1


def test_top_k_on_request_and_images_as_28_by_28(repo: Repo, server: str) -> None:
    X = _test_images(repo.root)[:3]
    _, proba = _expected(repo, X)

    status, answer = _request(f"{server}/invocations",
                              {"inputs": X.reshape(3, 28, 28).tolist(), "params": {"top_k": 3}})

    assert status == 200, answer
    for row, p in zip(answer["predictions"], proba, strict=True):
        order = np.argsort(-p, kind="stable")[:3]
        assert row["top_classes"] == order.tolist()
        assert row["top_class_names"] == [CLASS_NAMES[label] for label in order]
        assert np.allclose(row["top_probabilities"], p[order])
        assert row["top_classes"][0] == row["class"]


@pytest.mark.parametrize(("inputs", "reason"), [
    ([[0] * 783], "shape (1, 783): expected (n, 784) or (n, 28, 28)"),
    ([[300] * 784], "image 0 has 300 at pixel 0"),
    ([[-1] * 784], "image 0 has -1 at pixel 0"),
    ([[0.5] * 784], "found floats"),
    ([[255.9] * 784], "found floats"),
    ([[7] * 783 + [True]], "found booleans"),
    ([["7"] * 784], "found strings"),
    ([[None] * 784], "found nulls"),
    ([[10**30] * 784], f"image 0 has {10**30} at pixel 0"),
    ([], "no images"),
    ([[0] * 784, [0] * 783], "images of different shapes"),
])
def test_invocations_refuse_what_is_not_pixels(server: str, inputs: list, reason: str) -> None:
    status, answer = _request(f"{server}/invocations", {"inputs": inputs})
    assert status == 400, answer
    assert reason in answer["message"]
    assert "\n" not in answer["message"]


def test_bad_top_k_and_bad_json_are_refused(server: str) -> None:
    status, answer = _request(f"{server}/invocations",
                              {"inputs": [[0] * 784], "params": {"top_k": 11}})
    assert status == 400 and "params.top_k=11" in answer["message"]
    request = urllib.request.Request(f"{server}/invocations", data=b'{"inputs": [[1, 2',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 400
    assert "not valid JSON" in json.loads(error.value.read())["message"]


def test_a_body_over_the_limit_gets_413_and_errors_stay_small(server: str) -> None:
    """1 MB limit in this server; a 20 MB body of junk once came back whole in the error."""
    junk = b'{"inputs": [[' + b"1, " * 1_000_000 + b"1]]}"
    # Headers first, then the answer: the server refuses on the declared length and closes, so a
    # client still sending the body would see a broken pipe instead of the 413 (a race).
    address = urllib.parse.urlsplit(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(junk)))
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 413
    assert "limit of 1000000 bytes" in json.loads(body)["message"]
    assert len(body) < 1024
    # Just under the limit, but not pixels: refused with a short answer, not an echo.
    status, answer = _request(f"{server}/invocations", {"inputs": [["x" * 900_000]]})
    assert status == 400 and len(json.dumps(answer)) < 1024


def test_the_signature_documents_the_contract(repo: Repo) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo.root / 'mlflow.db'}")
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}@champion")
    signature = info.signature.to_dict()
    assert json.loads(signature["inputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, 784]}}]
    assert [column["name"] for column in json.loads(signature["outputs"])] == [
        "class", "class_name", "probability", "top_classes", "top_class_names",
        "top_probabilities"]
    assert json.loads(signature["params"])[0]["name"] == "top_k"
    flavor = info.flavors["python_function"]
    assert flavor["class_names"] == CLASS_NAMES
    assert "integers 0-255" in flavor["input_contract"]
    assert info.flavors["sklearn"]["serialization_format"] == "skops"


# --- Odd requests: a short JSON answer with the right status, no traceback in the server's log ---


def _raw(server: str, method: str, body: bytes, content_type: str = "application/json",
         path: str = "/invocations") -> tuple[int, dict[str, str], bytes]:
    address = urllib.parse.urlsplit(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _assert_log_clean(server: str) -> None:
    log = SERVER_LOGS[server].read_text()
    for sign in ("Traceback", "Unexpected ASGI message", "RecursionError", "Exception in ASGI"):
        assert sign not in log, log[-3000:]


def test_json_nested_beyond_the_depth_limit_gets_400(server: str) -> None:
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, _, body = _raw(server, "POST", deep)
    assert status == 400, body[:300]
    assert "nested" in json.loads(body)["message"] and len(body) < 1024
    # Brackets inside strings do not count; an escaped quote does not end a string.
    status, _, body = _raw(server, "POST", b'{"inputs": "\\\"' + b"[" * 50 + b'"}')
    assert status == 400 and "no images" in json.loads(body)["message"]
    _assert_log_clean(server)


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE", "PATCH"])
def test_a_wrong_method_on_invocations_gets_405_in_json(server: str, method: str) -> None:
    status, headers, body = _raw(server, method, json.dumps({"inputs": [[0] * 784]}).encode())
    assert status == 405, body
    assert headers.get("allow") == "POST" or headers.get("Allow") == "POST"
    answer = json.loads(body)
    assert answer["error_code"] == "METHOD_NOT_ALLOWED" and "POST" in answer["message"]
    _assert_log_clean(server)


# --- Bounded work: a worker, a queue of one, then 503; /ping answers all along -------------------


@pytest.fixture(scope="module")
def small_server(repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make serve` with one worker and one waiting place, and room for 5,000 images a request."""
    process, url = _start(
        [str(BIN / "python"), "-m", "pipeline.commands.serve", "--port", "{port}",
         "--max-body-mb", "20", "--workers", "1", "--queue", "1"],
        repo, tmp_path_factory.mktemp("serve-bounded") / "serve.log")
    try:
        yield url
    finally:
        _stop(process)


def test_max_size_requests_beyond_the_queue_get_503_and_ping_stays_prompt(
        small_server: str) -> None:
    """Six 5,000-image requests at once: one runs, one waits, the rest get 503 + Retry-After;
    meanwhile /ping and /health answer within a second (they once stalled for 11 s)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    body = json.dumps({"inputs": rng.integers(0, 256, (5000, 784)).tolist()}).encode()
    assert len(body) > 15_000_000
    answers: list[tuple[int, dict[str, str], bytes]] = []
    pings: list[float] = []
    done = threading.Event()

    def ping() -> None:
        while not done.is_set():
            for path in ("/ping", "/health"):
                start = time.monotonic()
                status = _raw(small_server, "GET", b"", path=path)[0]
                pings.append(time.monotonic() - start)
                assert status == 200
            time.sleep(0.05)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        with ThreadPoolExecutor(6) as clients:
            answers = list(clients.map(lambda _: _raw(small_server, "POST", body), range(6)))
    finally:
        done.set()
        pinger.join()
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and 503 in statuses, statuses
    for status, headers, text in answers:
        if status == 503:
            assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"
            assert json.loads(text)["error_code"] == "TEMPORARILY_UNAVAILABLE"
        else:
            assert len(json.loads(text)["predictions"]) == 5000
    assert len(pings) >= 4 and max(pings) < 1.5, pings
    _assert_log_clean(small_server)


def test_serve_answers_with_the_models_names_and_reports_differing_params(
        repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> None:
    import yaml

    folder = tmp_path_factory.mktemp("swapped")
    params = yaml.safe_load((repo.root / "params.yaml").read_text())
    trained = list(params["data"]["class_names"])
    params["data"]["class_names"][:2] = trained[1::-1]
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    process, url = _start(
        [str(BIN / "python"), "-m", "pipeline.commands.serve", "--port", "{port}",
         "--params", str(folder / "params.yaml")], repo, folder / "serve.log")
    try:
        X = _test_images(repo.root)
        labels, _ = _expected(repo, X)
        status, answer = _request(f"{url}/invocations", {"inputs": X.tolist()})
    finally:
        _stop(process)
    assert status == 200, answer
    assert [row["class_name"] for row in answer["predictions"]] == [trained[i] for i in labels]
    log = (folder / "serve.log").read_text()
    assert "warning: data.class_names in" in log and "serving the model's" in log
