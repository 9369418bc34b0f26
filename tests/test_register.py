"""The register stage against a real sqlite MLflow registry: promotion, idempotence, races."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline import config
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
    from pipeline import register as stage
    from pipeline import tracking
    from pipeline.outputs import Outputs

    cfg = make_config(name)
    tracking.connect(cfg.mlflow)
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


def test_registering_the_same_run_twice_adds_no_version(name: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = evaluated_run(0.8)
    register(name, *run, tmp_path / "a")
    again = register(name, *run, tmp_path / "a")
    assert again["reason"] == "already the champion"
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == 1


def test_a_failed_run_never_reaches_the_registry(name: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RunFileError

    with pytest.raises(RunFileError, match="FAILED"):
        register(name, *evaluated_run(0.99, status="FAILED"), tmp_path / "a")
    assert MlflowClient().search_registered_models(f"name='{name}'") == []


def test_two_registrations_at_once_wait_for_the_lock_and_keep_the_better(
        name: str, tmp_path: Path) -> None:
    """Both block while the registry lock is held, register nothing, then resolve correctly."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.register import registry_lock

    register(name, *evaluated_run(0.80), tmp_path / "base")
    candidates = [evaluated_run(0.90), evaluated_run(0.85)]
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from tests.test_register import register
        register(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    client = MlflowClient()
    with registry_lock(mlflow.get_tracking_uri()):
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script, name, run_id, uri, str(tmp_path / f"p{i}")],
                env=env, cwd=tmp_path,
            )
            for i, (run_id, uri) in enumerate(candidates)
        ]
        # Both have reopened their runs (RUNNING) just before they ask for the lock.
        deadline = time.monotonic() + 90
        while any(client.get_run(run_id).info.status != "RUNNING" for run_id, _ in candidates):
            assert time.monotonic() < deadline, "the registrations never started"
            time.sleep(0.2)
        time.sleep(3)  # without the lock, both would register within this time
        assert [p.poll() for p in processes] == [None, None]
        assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == candidates[0][0]
    assert len(client.search_model_versions(f"name='{name}'")) == 3


def test_sigterm_marks_the_run_failed(store: str, tmp_path: Path) -> None:
    """systemd, CI cancellation and `timeout` send SIGTERM: no run may stay RUNNING."""
    from mlflow.tracking import MlflowClient

    script = textwrap.dedent("""
        import time, mlflow
        from pipeline import tracking
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
