"""Promotion across machines: registrations racing against one real MLflow server.

Each registration is a separate process (as on separate machines: they share no file, only the
server and the lock database of team.env). A poller reads the champion all along, as `predict`
would.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.team_stack import Team

pytestmark = pytest.mark.slow
ACCURACIES = (0.84, 0.88, 0.81, 0.86, 0.83, 0.87)


def test_racing_registrations_leave_the_best_champion_and_never_a_worse_one(
        team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tests.test_register import evaluated_run, params_for_model, registrations

    for key, value in team.env.items():
        monkeypatch.setenv(key, value)
    # Six registrations in a row under the lock (each with the gate, the card and the ledger)
    # can outlast the default wait on a busy 2-core machine; this test is about the order.
    monkeypatch.setenv("FMNIST_REGISTRY_LOCK_TIMEOUT", "900")
    mlflow.set_tracking_uri(team.env["MLFLOW_TRACKING_URI"])
    name = "race-check"
    params = params_for_model(tmp_path / "params.yaml", name)
    rule = yaml.safe_load(params.read_text())["mlflow"]["promotion"]
    assert rule["metric"] == "test_accuracy"  # greater is better
    candidates = [evaluated_run(accuracy) for accuracy in ACCURACIES]
    client = MlflowClient()

    seen: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                version = client.get_model_version_by_alias(name, "champion")
                seen.append(float(version.tags["test_accuracy"]))
            except MlflowException:
                pass  # no registered model or no champion yet
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    workdirs = [tmp_path / f"machine{i}" for i in range(len(candidates))]
    try:
        with registrations(workdirs, candidates, params) as processes:
            codes = [process.wait(timeout=240) for process in processes]
    finally:
        stop.set()
        poller.join(timeout=10)
    assert codes == [0] * len(candidates), [(w / "stderr").read_text() for w in workdirs]

    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == len(candidates)
    champion = client.get_model_version_by_alias(name, "champion")
    holders = [v.version for v in versions
               if "champion" in client.get_model_version(name, v.version).aliases]
    assert holders == [champion.version]
    assert float(champion.tags["test_accuracy"]) == max(ACCURACIES)
    # The champion as the poller saw it never got worse.
    assert seen and seen == sorted(seen), seen
    assert seen[-1] == max(ACCURACIES)
    # Each compare-and-set saw the champion the previous one left: the registrations ran one
    # after the other (version numbers are handed out inside the lock), whatever their order.
    records = sorted((json.loads((w / "models" / "registration.json").read_text())
                      for w in workdirs), key=lambda r: int(r["candidate"]["version"]))
    best: float | None = None
    for record in records:
        before = record["champion_before"]
        assert (before["value"] if before else None) == best, records
        value = record["candidate"]["value"]
        assert record["promoted"] == (best is None or value > best + rule["min_improvement"])
        best = value if record["promoted"] else best
    waited = [w for w in workdirs if "waiting for the registry lock held by fashion-mnist"
              in (w / "stderr").read_text()]
    print(f"race: {len(candidates)} registrations, {len(waited)} waited for the lock; "
          f"champion seen {len(seen)} times: {sorted(set(seen))}")


def test_a_read_users_rollback_is_refused_in_one_line(
        team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the team's server, moving `champion` back needs EDIT: a READ user's `rollback` is
    MLflow's 403 as one line, and neither the alias nor the ledger changes."""
    import os
    import subprocess
    import sys

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.support import champion_ledger
    from tests.synthetic import REPO_ROOT
    from tests.team_stack import read_env_file
    from tests.test_register import evaluated_run, params_for_model, register

    for key, value in team.env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team.env["MLFLOW_TRACKING_URI"])
    name = "rollback-check"
    params = params_for_model(tmp_path / "params.yaml", name)
    for accuracy, folder in ((0.80, "a"), (0.85, "b")):
        assert register(name, *evaluated_run(accuracy, loadable=True), tmp_path / folder)[
            "promoted"]
    team.command("user", "rollback-reader", "--permission", "READ", "--params", str(params))
    reader = read_env_file(team.state / "users" / "rollback-reader.env")
    env = {**team.client_environment(dict(os.environ)), **reader,
           "PYTHONPATH": str(REPO_ROOT)}
    refused = subprocess.run([sys.executable, "-m", "pipeline.commands.rollback", "--params",
                              str(params), "--reason", "not mine to move"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith("rollback: error: the MLflow tracking server refused user "
                                     "'rollback-reader' this change (HTTP 403"), refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and "Traceback" not in refused.stderr
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    experiment = client.get_experiment_by_name("fashion-mnist").experiment_id
    records = champion_ledger.read(client, experiment, name)
    assert [r["to_version"] for r in records] == ["1", "2"]
    # On a server, the ledger names the MLflow user who moved the alias.
    assert {r["user"] for r in records} == {team.env["MLFLOW_TRACKING_USERNAME"]}


def test_the_lock_is_one_whatever_the_url_spelling_and_its_wait_is_bounded(
        team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held under one spelling of the server's URL, the lock stops registrations made under
    every other spelling; each waits FMNIST_REGISTRY_LOCK_TIMEOUT seconds, then fails with one
    line naming the holder, and registers nothing."""
    import os
    import socket

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.stages.register import registry_lock
    from tests.test_register import evaluated_run, params_for_model, registrations

    for key, value in team.env.items():
        monkeypatch.setenv(key, value)
    uri = team.env["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    name = "spelling-check"
    params = params_for_model(tmp_path / "params.yaml", name)
    port = uri.rsplit(":", 1)[1]
    spellings = [f"http://localhost:{port}", f"http://127.0.0.1:{port}/",
                 f"http://localhost:{port}/"]
    candidates = [evaluated_run(0.9) for _ in spellings]
    workdirs = [tmp_path / f"spelling{i}" for i in range(len(spellings))]
    monkeypatch.setenv("FMNIST_REGISTRY_LOCK_TIMEOUT", "3")
    with registry_lock(uri):  # as spelt in team.env
        started = time.monotonic()
        processes = []
        for workdir, candidate, spelling in zip(workdirs, candidates, spellings, strict=True):
            monkeypatch.setenv("MLFLOW_TRACKING_URI", spelling)
            context = registrations([workdir], [candidate], params)
            processes.append((context, context.__enter__()[0]))
        codes = [process.wait(timeout=120) for _, process in processes]
        seconds = time.monotonic() - started
        for context, _ in processes:
            context.__exit__(None, None, None)
    assert codes == [1] * len(spellings), [(w / "stderr").read_text() for w in workdirs]
    for workdir in workdirs:
        lines = (workdir / "stderr").read_text().strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("register: waiting"), lines
        error = lines[1]
        assert error.startswith("register: error: "), error
        assert "still held after 3 s by fashion-mnist pid" in error
        assert f"pid {os.getpid()} on {socket.gethostname()}" in error
        assert "server pid" in error and "Traceback" not in error
        assert not (workdir / "models" / "registration.json").exists()
    assert seconds < 60
    assert not MlflowClient().search_model_versions(f"name='{name}'")  # nothing registered
