"""The registry read without MLflow's client gives MLflow's answers, and `predict` relies on it.

A real sqlite store and registry, written by MLflow's client: versions, aliases, a deleted
version. The direct reader and MLflow's client are asked the same questions and must agree,
down to the bytes of the model's files. (The same comparison against a tracking server, with a
read-only user, is in tests/test_team_stack.py.)
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.commands import predict
from pipeline.core.estimator import SoftmaxRegression
from pipeline.support import model_files, model_loader, registry_reader
from tests.repo_copy import MODEL_NAME
from tests.synthetic import REPO_ROOT, data_params, make_dataset, write_params


@dataclass
class Registry:
    root: Path
    tracking_uri: str
    estimators: dict[str, SoftmaxRegression]  # version -> what was logged
    X: np.ndarray
    params: Path


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, archives) -> Registry:
    """Versions 1..3 of MODEL_NAME; 1 deleted, champion -> 2, challenger -> 3."""
    import mlflow
    import mlflow.sklearn
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("registry-reader")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    X, y = make_dataset(10, seed=4)
    X = X.reshape(len(X), 784)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment("reader", artifact_location=str(root / "artifacts"))
    estimators = {}
    for version, epochs in zip("123", (1, 2, 3), strict=True):
        estimator = SoftmaxRegression(epochs=epochs, random_state=0).fit(X, y)
        with mlflow.start_run(experiment_id=experiment):
            mlflow.sklearn.log_model(estimator, name="model", serialization_format="skops",
                                     skops_trusted_types=model_files.TRUSTED_TYPES,
                                     registered_model_name=MODEL_NAME)
        estimators[version] = estimator
    client.set_registered_model_alias(MODEL_NAME, "champion", "2")
    client.set_registered_model_alias(MODEL_NAME, "challenger", "3")
    client.delete_model_version(MODEL_NAME, "1")
    client.create_registered_model("empty")
    mlflow.set_tracking_uri(None)
    params = write_params(root / "params.yaml", data_params(archives.specs))
    return Registry(root, uri, estimators, X, params)


@pytest.fixture
def client_registry(registry: Registry, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    mlflow.set_tracking_uri(registry.tracking_uri)
    yield registry_reader.ClientRegistry()
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_the_sqlite_reader_gives_the_clients_answers(registry: Registry,
                                                     client_registry) -> None:
    direct = registry_reader.open_registry(registry.tracking_uri)
    assert isinstance(direct, registry_reader.SqliteRegistry)
    for name in (MODEL_NAME, "empty", "absent"):
        assert direct.aliases(name) == client_registry.aliases(name)
        if name != "absent":
            assert direct.versions(name) == client_registry.versions(name)
    assert direct.aliases(MODEL_NAME) == {"champion": "2", "challenger": "3"}
    assert direct.aliases("absent") is None
    assert direct.versions(MODEL_NAME) == [2, 3]  # version 1 was deleted
    for version in ("2", "3"):
        mine, theirs = direct.version(MODEL_NAME, version), client_registry.version(
            MODEL_NAME, version)
        assert (mine.version, mine.run_id) == (theirs.version, theirs.run_id)
    for missing in ("1", "9"):  # deleted, never made
        assert direct.version(MODEL_NAME, missing) is None
        assert client_registry.version(MODEL_NAME, missing) is None


@pytest.mark.slow
def test_the_files_read_are_the_files_mlflow_downloads(registry: Registry, client_registry,
                                                       tmp_path: Path) -> None:
    import mlflow.artifacts

    record = registry_reader.open_registry(registry.tracking_uri).version(MODEL_NAME, "2")
    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/2",
                                                          dst_path=str(tmp_path)))
    for name in ("MLmodel", "model.skops"):
        assert record.read(name, 1 << 20) == (downloaded / name).read_bytes()
    loaded = model_loader.load_model_files(record.read, f"models:/{MODEL_NAME}/2")
    assert np.array_equal(loaded.predict_proba(registry.X),
                          registry.estimators["2"].predict_proba(registry.X))


@pytest.mark.slow
def test_a_file_over_its_cap_or_not_regular_is_refused(registry: Registry) -> None:
    record = registry_reader.open_registry(registry.tracking_uri).version(MODEL_NAME, "3")
    with pytest.raises(registry_reader.RegistryError, match="bytes allowed"):
        record.read("model.skops", 100)
    with pytest.raises(registry_reader.RegistryError, match="missing from the model's folder"):
        record.read("nothing.here", 100)


@pytest.mark.slow
def test_what_the_reader_leaves_to_mlflow(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(registry_reader.Unsupported):
        registry_reader.open_registry(f"file://{tmp_path}")
    with pytest.raises(registry_reader.Unsupported):
        registry_reader.open_registry(f"sqlite:///{tmp_path / 'absent.db'}")
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()  # a sqlite file without MLflow's tables
    with pytest.raises(registry_reader.Unsupported, match="no such table"):
        registry_reader.open_registry(f"sqlite:///{other}").aliases(MODEL_NAME)
    for location in ("s3://bucket/model", "mlflow-artifacts:/1/models/m-1/artifacts"):
        with pytest.raises(registry_reader.Unsupported, match="the model's files are at"):
            registry_reader.local_folder(location)
    server = registry_reader.RestRegistry("http://127.0.0.1:5000")
    for location in ("s3://bucket/1/models/m-1/artifacts", "/srv/mlruns/1/models/m-1/artifacts",
                     "mlflow-artifacts://elsewhere:5000/1/models/m-1/artifacts"):
        with pytest.raises(registry_reader.Unsupported, match="the model's files are at"):
            server._proxied_reader(location)  # read with the client's own access, by MLflow
    server._proxied_reader("mlflow-artifacts://127.0.0.1:5000/1/models/m-1/artifacts")


def _predict(registry: Registry, *args: str, **env: str) -> tuple[int, str, str]:
    script = ("import sys; from pipeline import predict; "
              f"code = predict.main({list(args)!r}); "
              "print('mlflow' in sys.modules, code)")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=registry.root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
             "MLFLOW_TRACKING_URI": registry.tracking_uri, **env}, timeout=120)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
def test_predict_answers_with_the_champion_without_importing_mlflow(registry: Registry) -> None:
    np.save(registry.root / "x.npy", registry.X[:3])
    code, out, err = _predict(registry, "x.npy", "--json", "--params", str(registry.params))
    assert code == 0, err
    assert out.splitlines()[-1] == "False 0"  # MLflow was never imported
    assert f"models:/{MODEL_NAME}@champion (version 2, run" in err
    labels = [line.split('"label": ')[1].split(",")[0] for line in out.splitlines()[1:-2]]
    assert labels == [str(v) for v in registry.estimators["2"].predict(registry.X[:3])]


@pytest.mark.slow
def test_predict_gives_the_same_answer_through_mlflows_client(
        registry: Registry, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """When the reader steps aside (another schema, artifacts in S3...), MLflow answers the same."""
    np.save(registry.root / "x.npy", registry.X[:3])
    args = [str(registry.root / "x.npy"), "--json", "--params", str(registry.params)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert predict.main(args) == 0
    direct = capsys.readouterr()

    def unsupported(uri: str):
        raise registry_reader.Unsupported("as if the store were unknown")

    monkeypatch.setattr(registry_reader, "open_registry", unsupported)
    assert predict.main(args) == 0
    through_mlflow = capsys.readouterr()
    assert "mlflow" in sys.modules
    assert through_mlflow.out == direct.out
    assert through_mlflow.err == direct.err  # the same version and run are named


@pytest.mark.slow
def test_the_verified_revision_is_the_one_mlflow_creates(registry: Registry) -> None:
    """The tests above ran on a store of this revision: the reader is verified on it."""
    with contextlib.closing(sqlite3.connect(registry.root / "mlflow.db")) as db:
        revision = db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert revision in registry_reader.VERIFIED_REVISIONS, (
        f"MLflow now creates schema revision {revision}: if the differential tests above pass "
        "on it, add it to registry_reader.VERIFIED_REVISIONS")


def _with_revision(registry: Registry, tmp_path: Path, revision: str) -> str:
    """A copy of the registry's store (the same model files) at another schema revision."""
    copy = tmp_path / "mlflow.db"
    shutil.copy(registry.root / "mlflow.db", copy)
    with contextlib.closing(sqlite3.connect(copy)) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))
        db.commit()
    return f"sqlite:///{copy}"


@pytest.mark.slow
def test_a_schema_revision_not_verified_is_left_to_mlflow(registry: Registry,
                                                          tmp_path: Path) -> None:
    """The tables still read the same, but only MLflow's client may judge another schema."""
    np.save(registry.root / "x.npy", registry.X[:3])
    args = ("x.npy", "--json", "--params", str(registry.params))
    verified = _with_revision(registry, tmp_path, registry_reader.VERIFIED_REVISIONS[0])
    assert _predict(registry, *args, MLFLOW_TRACKING_URI=verified)[1].endswith("False 0\n")
    unknown = _with_revision(registry, tmp_path, "0123456789ab")
    code, out, err = _predict(registry, *args, MLFLOW_TRACKING_URI=unknown)
    assert out.splitlines()[-1] == "True 3", err  # MLflow answered, and refused the schema
    assert "0123456789ab" in err and "mlflow db upgrade" in err and "Traceback" not in err
    with pytest.raises(registry_reader.Unsupported, match="schema revision 0123456789ab"):
        registry_reader.open_registry(unknown).aliases(MODEL_NAME)


@pytest.mark.slow
def test_the_switch_turns_the_reader_off(registry: Registry,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(registry.root / "x.npy", registry.X[:3])
    args = ("x.npy", "--json", "--params", str(registry.params))
    direct = _predict(registry, *args)
    through_mlflow = _predict(registry, *args, FMNIST_REGISTRY_READER="0")
    assert direct[1].splitlines()[-1] == "False 0"
    assert through_mlflow[1].splitlines()[-1] == "True 0", through_mlflow[2]
    assert through_mlflow[1].replace("True 0", "False 0") == direct[1]  # the same predictions
    assert through_mlflow[2] == direct[2]  # of the same version and run
    monkeypatch.setenv("FMNIST_REGISTRY_READER", "0")
    with pytest.raises(registry_reader.Unsupported, match="FMNIST_REGISTRY_READER"):
        registry_reader.open_registry(registry.tracking_uri)


@pytest.mark.slow
@pytest.mark.parametrize(("uri", "message"), [
    (f"models:/{MODEL_NAME}@nope", f"'{MODEL_NAME}' has no alias 'nope' "
                                   "(aliases: challenger -> version 3, champion -> version 2)"),
    (f"models:/{MODEL_NAME}/1", f"'{MODEL_NAME}' has no version 1 (versions: 2, 3)"),
    ("models:/empty@champion", "no champion yet for 'empty'"),
])
def test_missing_aliases_and_deleted_versions_are_named(registry: Registry, uri: str,
                                                        message: str) -> None:
    np.save(registry.root / "x.npy", registry.X[:1])
    code, out, err = _predict(registry, "x.npy", "--model", uri, "--params",
                              str(registry.params))
    assert code == 0 and out.splitlines()[-1] == "False 3", err
    assert message in err


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a redirect to `target`, or records what it was sent."""

    target: str | None = None
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.target is not None:
            self.send_response(302)
            self.send_header("Location", self.target + self.path)
            self.end_headers()
            return
        type(self).seen.append({**self.headers, "path": self.path})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Servers:
    redirecting: str  # redirects every request to `recording`
    recording: str
    seen: list[dict[str, str]]  # what `recording` received: headers and "path"


@pytest.fixture
def servers() -> Iterator[Servers]:
    recorder = type("Recorder", (_Recorder,), {"target": None, "seen": []})
    running = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), recorder)]
    recording = f"http://127.0.0.1:{running[0].server_address[1]}"
    redirector = type("Redirector", (_Recorder,), {"target": recording})
    running.append(http.server.ThreadingHTTPServer(("127.0.0.1", 0), redirector))
    for server in running:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Servers(f"http://127.0.0.1:{running[1].server_address[1]}", recording, recorder.seen)
    for server in running:
        server.shutdown()
        server.server_close()


def test_credentials_never_follow_a_redirect(servers: Servers, monkeypatch) -> None:
    from pipeline.support import store

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    with pytest.raises(store.StoreUnavailable, match="answered HTTP 302 redirected to http"):
        store.check_server(servers.redirecting)
    with pytest.raises(registry_reader.RegistryError, match="HTTP 302"):
        registry_reader.open_registry(servers.redirecting).aliases(MODEL_NAME)
    assert servers.seen == []  # the other host never saw the password


def test_artifact_paths_are_quoted_as_mlflow_quotes_them(servers: Servers) -> None:
    read = registry_reader.RestRegistry(servers.recording)._proxied_reader(
        "mlflow-artifacts:/my models/1/models/m-1/artifacts")
    assert read("MLmodel", 100) == b"{}"
    assert servers.seen[-1]["path"] == (
        "/api/2.0/mlflow-artifacts/artifacts/my%20models/1/models/m-1/artifacts/MLmodel")


@pytest.mark.slow
@pytest.mark.parametrize("setting", [
    {"MLFLOW_WORKSPACE": "team"}, {"MLFLOW_ENABLE_WORKSPACES": "true"},
    {"MLFLOW_TRACKING_AUTH": "my_plugin"}, {"MLFLOW_REGISTRY_URI": "sqlite:///other.db"},
])
def test_settings_that_make_mlflow_read_another_registry_are_left_to_it(
        registry: Registry, monkeypatch: pytest.MonkeyPatch, setting: dict[str, str]) -> None:
    """With them, MLflow's client would answer from another workspace, registry or with
    another authentication: the reader must not answer in its place."""
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(registry_reader.Unsupported, match="is set|the registry is"):
        registry_reader.open_registry(registry.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry.tracking_uri)  # the same store: fine
    for key in setting:
        if key != "MLFLOW_REGISTRY_URI":
            monkeypatch.setenv(key, "false")
    assert registry_reader.open_registry(registry.tracking_uri).aliases(MODEL_NAME)


@pytest.mark.slow
def test_latest_is_left_to_mlflow_which_takes_the_newest_version(registry: Registry) -> None:
    np.save(registry.root / "x.npy", registry.X[:3])
    code, out, err = _predict(registry, "x.npy", "--json", "--model",
                              f"models:/{MODEL_NAME}@latest", "--params", str(registry.params))
    assert code == 0, err
    labels = [line.split('"label": ')[1].split(",")[0] for line in out.splitlines()[1:-2]]
    assert labels == [str(v) for v in registry.estimators["3"].predict(registry.X[:3])]


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS 'tracking server' with a self-signed certificate (a private CA's, in effect)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate: apt-get install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    recorder = type("Recorder", (_Recorder,), {"target": None, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


def test_tls_follows_mlflows_variables(https_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server with a private CA: refused by default, trusted with MLflow's own settings."""
    from pipeline.support import store

    url, cert = https_server
    for key in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(store.StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        store.check_server(url)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
    store.check_server(url)
    assert registry_reader.open_registry(url).aliases(MODEL_NAME) == {}
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    store.check_server(url)


# --- A real `mlflow server` on a copy of the store: odd names and versions ---------------------


@pytest.fixture(scope="module")
def rest_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a copy of the registry, with one more model, named `x'y`."""
    import shutil
    import signal
    import socket
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("rest-store")
    shutil.copy(registry.root / "mlflow.db", root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db:
        (folder,), = db.execute("SELECT storage_location FROM model_versions WHERE version = 2")
    client.create_registered_model("x'y")
    client.create_model_version("x'y", folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(root / "server.log", "w")  # noqa: SIM115 (open while the server runs)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        log.close()


@pytest.mark.slow
@pytest.mark.parametrize(("uri", "message"), [
    ("models:/x'y/9", "\"x'y\" has no version 9 (versions: 1)"),
    (f"models:/{MODEL_NAME}/{10**23}", f"has no version {10**23} (versions: 2, 3)"),
    (f"models:/{MODEL_NAME}/\u0661", "a version is a number written with the digits 0-9"),
])
def test_odd_names_and_versions_against_a_server(registry: Registry, rest_server: str,
                                                 uri: str, message: str) -> None:
    np.save(registry.root / "x.npy", registry.X[:1])
    code, out, err = _predict(registry, "x.npy", "--model", uri, "--params",
                              str(registry.params), MLFLOW_TRACKING_URI=rest_server)
    assert out.splitlines()[-1].endswith(" 3"), err
    assert message in err and len(err.encode()) < 1024 and "Traceback" not in err, err


def test_a_servers_long_error_is_cut_to_one_short_line() -> None:
    line = registry_reader.short("SELECT model_versions.name ...\n" + "x " * 2000)
    assert len(line) <= registry_reader.MAX_MESSAGE_CHARS and "\n" not in line
    assert registry_reader.filter_string("x'y") == 'name="x\'y"'
    assert registry_reader.filter_string('a"b') == "name='a\"b'"
