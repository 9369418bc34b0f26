"""No run left RUNNING: a run whose process was killed is closed by the next `make train`, even
one whose `dvc repro` has nothing to do (its preflight closes them), and by `make ui`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.synthetic import REPO_ROOT
from tests.test_serve import _free_port, _stop

START_AND_DIE = textwrap.dedent("""
    import os, socket, sys
    import mlflow
    mlflow.set_tracking_uri(sys.argv[1])
    mlflow.set_experiment("fashion-mnist")
    run = mlflow.start_run()
    mlflow.set_tags({"host": socket.gethostname(), "pid": str(os.getpid())})
    print(run.info.run_id, flush=True)
    os._exit(0)  # as SIGKILL would: the run stays RUNNING
""")


def _env(uri: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONPATH": str(REPO_ROOT)}


def _killed_run(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = subprocess.run([sys.executable, "-c", START_AND_DIE, uri], env=_env(uri),
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    return uri, started.stdout.split()[-1]


def _status(uri: str, run_id: str) -> tuple[str, str | None]:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    return run.info.status, run.data.tags.get("failure_reason")


def test_make_train_runs_the_preflight_before_dvc_repro() -> None:
    commands = subprocess.run(["make", "-n", "-W", "params.yaml", "train"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60).stdout.splitlines()
    preflight = next(i for i, line in enumerate(commands) if "pipeline.commands.preflight" in line)
    assert preflight < next(i for i, line in enumerate(commands) if line.startswith("dvc repro"))


def test_the_preflight_of_make_train_closes_a_killed_run(tmp_path: Path) -> None:
    uri, run_id = _killed_run(tmp_path)
    assert _status(uri, run_id) == ("RUNNING", None)
    script = ("import sys; from pipeline.commands import preflight; code = preflight.main(["
              f"'--params', {str(REPO_ROOT / 'params.yaml')!r}]); "
              "print('mlflow' in sys.modules, code)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(uri),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "True 0", result.stderr
    assert f"marked FAILED (killed: process gone): MLflow run {run_id}" in result.stderr
    assert _status(uri, run_id) == ("FAILED", "killed")
    # Nothing left to close: one query, MLflow is not even imported.
    again = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(uri),
                           capture_output=True, text=True, timeout=120)
    assert again.stdout.splitlines()[-1] == "False 0", again.stderr
    assert "marked FAILED" not in again.stderr


@pytest.mark.slow
def test_make_ui_closes_a_killed_run(tmp_path: Path) -> None:
    uri, run_id = _killed_run(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.commands.ui", "--port", str(_free_port()),
         "--params", str(REPO_ROOT / "params.yaml")], cwd=tmp_path, env=_env(uri),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        while not any(line.startswith("ui: http://") for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
    finally:
        _stop(process)
    assert any(f"MLflow run {run_id}" in line for line in lines), lines
    assert _status(uri, run_id) == ("FAILED", "killed")
