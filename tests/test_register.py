"""The register stage against a real sqlite MLflow registry: promotion, idempotence, races."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.support import config
from tests.synthetic import REPO_ROOT


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One store for the module (a fresh sqlite store costs seconds of migrations)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        mlflow.set_tracking_uri(uri)  # an earlier module's explicit URI would otherwise stick
        yield uri


@pytest.fixture()
def name(request: pytest.FixtureRequest, store: str, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered model of the test's own, so tests sharing the store stay independent."""
    monkeypatch.chdir(tmp_path)
    return f"model-{request.node.name}"


def params_for_model(path: Path, name: str) -> Path:
    """The project's params.yaml at `path`, registering as `name`: a stage in a process of its
    own registers the test's model."""
    tree = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    tree["mlflow"]["registered_model"] = name
    path.write_text(yaml.safe_dump(tree))
    return path


@contextmanager
def registrations(workdirs: list[Path], candidates: list[tuple[str, str]],
                  params: Path) -> Iterator[list[subprocess.Popen]]:
    """One register-stage process per (workdir, candidate run), each with the run's run.json
    and its stdout/stderr files in its workdir; any still running at the end is killed with
    its process group, whatever happened."""
    from pipeline.support.tracking import write_run_file

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # MLFLOW_*: the test's store or server
    processes: list[subprocess.Popen] = []
    try:
        for workdir, (run_id, uri) in zip(workdirs, candidates, strict=True):
            write_run_file(workdir / "models" / "run.json", run_id, model_uri=uri)
            with open(workdir / "stdout", "w") as out, open(workdir / "stderr", "w") as err:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "pipeline.stages.register", "--params", str(params)],
                    env=env, cwd=workdir, stdout=out, stderr=err, start_new_session=True))
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def make_config(name: str) -> config.Config:
    cfg = config.load(REPO_ROOT / "params.yaml")
    cfg.mlflow.registered_model = name
    return cfg


def evaluated_run(test_accuracy: float, status: str = "FINISHED") -> tuple[str, str]:
    """A finished run with a small logged model and a test accuracy, as evaluate leaves it."""
    import mlflow
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    X = np.array([[0.0], [1.0], [2.0], [3.0]])
    model = LogisticRegression().fit(X, [0, 0, 1, 1])
    mlflow.set_experiment("fashion-mnist")
    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
        mlflow.log_metric("test_accuracy", test_accuracy)
    if status != "FINISHED":
        mlflow.tracking.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id, info.model_uri


def register(name: str, run_id: str, model_uri: str, out: Path) -> dict:
    from pipeline.stages import register as stage
    from pipeline.support.outputs import Outputs
    from pipeline.support.store import connect

    cfg = make_config(name)
    connect(cfg.mlflow)
    return stage.run(cfg, Outputs(out), run_id, model_uri)


def champion_version(name: str) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(name, "champion").version)


def test_promotes_better_keeps_worse_and_ties(name: str, tmp_path: Path) -> None:
    first = register(name, *evaluated_run(0.80), tmp_path / "a")
    assert first["promoted"] and first["champion_before"] is None
    assert champion_version(name) == "1"
    better = register(name, *evaluated_run(0.85), tmp_path / "b")
    assert better["promoted"] and better["champion_before"]["version"] == "1"
    worse = register(name, *evaluated_run(0.83), tmp_path / "c")
    assert not worse["promoted"] and "worse" in worse["reason"]
    tie = register(name, *evaluated_run(0.85), tmp_path / "d")
    assert not tie["promoted"] and "ties" in tie["reason"]
    assert champion_version(name) == "2"
    recorded = json.loads((tmp_path / "d" / "models" / "registration.json").read_text())
    assert recorded["champion_after"]["version"] == "2"
    # The runs list shows the champion: its run alone has the tag, moved with the alias.
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tagged = {record["run_id"]: client.get_run(record["run_id"]).data.tags.get("champion")
              for record in (first, better, worse, tie)}
    assert tagged == {first["run_id"]: None, better["run_id"]: "true", worse["run_id"]: None,
                      tie["run_id"]: None}


def test_registering_the_same_run_twice_adds_no_version(name: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = evaluated_run(0.8)
    register(name, *run, tmp_path / "a")
    again = register(name, *run, tmp_path / "a")
    assert again["reason"] == "already the champion"
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == 1


def test_a_failed_run_never_reaches_the_registry(name: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.support.tracking import RunFileError

    with pytest.raises(RunFileError, match="FAILED"):
        register(name, *evaluated_run(0.99, status="FAILED"), tmp_path / "a")
    assert MlflowClient().search_registered_models(f"name='{name}'") == []


def wait_for_line(process: subprocess.Popen, log: Path, text: str, timeout: float = 60) -> None:
    """Poll `log` (the process's stderr) until it holds `text`; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if process.poll() is not None:
            if text in log.read_text():  # written just before it ended
                return
            pytest.fail(f"the registration ended (exit {process.returncode}) without "
                        f"printing {text!r}; stderr:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} within {timeout} s; stderr:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.mark.slow
def test_two_registrations_at_once_wait_for_the_lock_and_keep_the_better(
        name: str, store: str, tmp_path: Path) -> None:
    """Two real register stages meet the registry lock held (here by the test itself).

    Each must say that it waits for the lock and for whom, and register nothing while it waits;
    once the lock is released they take it in turn: the second to go sees the first's result,
    and the better candidate ends up champion. No sleep decides anything: without the lock the
    stages never print the waiting line and the test fails as soon as one of them ends.
    """
    from mlflow.tracking import MlflowClient

    from pipeline.stages.register import registry_lock

    register(name, *evaluated_run(0.80), tmp_path / "base")
    candidates = [evaluated_run(0.90), evaluated_run(0.85)]
    params = params_for_model(tmp_path / "params.yaml", name)
    client = MlflowClient()
    waiting = f"register: waiting for the registry lock held by pid {os.getpid()} since"
    workdirs = [tmp_path / f"p{i}" for i in range(len(candidates))]
    with contextlib.ExitStack() as stack:
        held = stack.enter_context(contextlib.ExitStack())  # released below, or on failure
        held.enter_context(registry_lock(store))  # taken before the processes start
        processes = stack.enter_context(registrations(workdirs, candidates, params))
        for process, workdir in zip(processes, workdirs, strict=True):
            wait_for_line(process, workdir / "stderr", waiting)
        # Both have found the lock busy and are blocked on it: the registry and the
        # registration files are as they were.
        assert [p.poll() for p in processes] == [None, None]
        assert len(client.search_model_versions(f"name='{name}'")) == 1
        assert champion_version(name) == "1"
        assert not any((w / "models" / "registration.json").exists() for w in workdirs)
        released_ms = int(time.time() * 1000)
        held.close()
        assert [p.wait(timeout=120) for p in processes] == [0, 0]
    for workdir in workdirs:
        assert (workdir / "stdout").read_text().startswith("register: ")
    versions = client.search_model_versions(f"name='{name}'")
    new_versions = [v for v in versions if str(v.version) != "1"]
    assert len(new_versions) == 2
    # Registered once the lock was free, not merely announced and then ignored.
    assert all(int(v.creation_timestamp) >= released_ms for v in new_versions)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == candidates[0][0]
    # The compare-and-set ran one after the other: the later registration compared itself with
    # the champion the earlier one left (whichever went first, both beat version 1).
    records = [json.loads((w / "models" / "registration.json").read_text()) for w in workdirs]
    first, second = sorted(records, key=lambda record: int(record["candidate"]["version"]))
    assert first["promoted"] and first["champion_before"]["version"] == "1"
    assert second["champion_before"]["version"] == first["candidate"]["version"]
    assert second["champion_after"]["version"] == str(champion.version)


@pytest.mark.slow
def test_sigterm_marks_the_run_failed(store: str, tmp_path: Path) -> None:
    """systemd, CI cancellation and `timeout` send SIGTERM: no run may stay RUNNING."""
    from mlflow.tracking import MlflowClient

    script = textwrap.dedent("""
        import time, mlflow
        from pipeline.support import tracking
        tracking.fail_runs_on_sigterm()
        with mlflow.start_run() as run:
            print(run.info.run_id, flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().strip()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
