"""A fresh clone's `make train` reproduces what is committed, and a switch of store is noticed.

Real git, real DVC, real `make train`, a real sqlite MLflow store: the copy's first `make train`
is committed (as the lead commits dvc.lock from a fresh clone), then a clone of that commit trains
from nothing and must leave `git status` clean. In that clone, mlflow.db moves away and the next
`make train` must record a run and a version in the new store, not report the old ones.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.repo_copy import BIN, MAKE, MODEL_NAME, Repo, make_repo
from tests.test_serve import _free_port, _stop
from tests.test_ui import _wait_for

pytestmark = pytest.mark.slow

GIT = ("git", "-c", "user.name=test", "-c", "user.email=test@localhost")


def _status(repo: Repo) -> str:
    return repo.run("git", "status", "--porcelain", "--untracked-files=all").stdout


def _client(repo: Repo):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{repo.root / 'mlflow.db'}")
    return MlflowClient()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A clone of a commit that holds what `make train` wrote, after its own `make train`."""
    base = tmp_path_factory.mktemp("clean-clone")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        origin = make_repo(base / "origin", base / "mirror")
        origin.run(*MAKE, "train")
        origin.run("git", "add", "-A")
        origin.run(*GIT, "commit", "-qm", "make train")
        subprocess.run(["git", "clone", "-q", str(origin.root), str(base / "clone")], check=True)
        repo = Repo(base / "clone", base / "mirror")
        (repo.root / "data" / "extra").mkdir(parents=True, exist_ok=True)  # as `make setup`
        repo.run(*MAKE, "train")
        yield repo


def test_a_fresh_clone_is_clean_after_make_train(clone: Repo) -> None:
    assert _status(clone) == ""
    for record in ("models/run.json", "models/registration.json"):
        assert (clone.root / record).is_file()
        assert clone.run("git", "ls-files", record).stdout == ""
    assert "train_seconds" not in clone.json("metrics/train.json")
    assert clone.json("models/run.json")["train_seconds"] > 0
    # The check of a no-op `make train` reads the sqlite store without importing MLflow (3 s).
    checked = clone.run(sys.executable, "-c", (
        "import runpy, sys\nsys.argv = ['summary']\ntry:\n"
        "    runpy.run_module('pipeline.commands.summary', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"))
    assert "champion after   version 1" in checked.stdout


def test_a_moved_store_gets_a_run_and_a_version_from_make_train(clone: Repo,
                                                                tmp_path: Path) -> None:
    old_run = clone.json("models/run.json")["run_id"]
    shutil.move(clone.root / "mlflow.db", tmp_path / "mlflow.db")
    result = clone.run(*MAKE, "train")
    assert "dvc repro --force --downstream train" in result.stderr
    client = _client(clone)
    run_id = clone.json("models/run.json")["run_id"]
    assert run_id != old_run
    assert client.get_run(run_id).info.status == "FINISHED"
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.run_id == run_id and str(champion.version) == "1"
    assert f"({run_id})" in result.stdout and old_run not in result.stdout
    assert "champion after   version 1" in result.stdout
    assert _status(clone) == ""  # the same model, metrics and dvc.lock in the new store


def test_the_summary_never_reports_a_run_the_store_lacks(clone: Repo, tmp_path: Path) -> None:
    run_id = clone.json("models/run.json")["run_id"]
    shutil.move(clone.root / "mlflow.db", tmp_path / "mlflow.db")
    try:
        result = clone.run(sys.executable, "-m", "pipeline.commands.summary", check=False)
    finally:
        shutil.move(tmp_path / "mlflow.db", clone.root / "mlflow.db")
    assert result.returncode == 1
    assert run_id not in result.stdout and "champion" not in result.stdout
    assert f"has no run {run_id}" in result.stderr
    assert "`dvc repro --force --downstream train`" in result.stderr


def test_a_refused_configuration_leaves_no_output_folder(clone: Repo) -> None:
    result = clone.run(sys.executable, "-m", "pipeline.train", "model.epochs=-1", check=False)
    assert result.returncode == 1
    assert "model.epochs=-1 is invalid" in result.stderr
    assert not (clone.root / "outputs").exists()
    assert _status(clone) == ""


def test_a_clone_without_run_records_gets_its_own_run(clone: Repo) -> None:
    """A clone whose outputs came from `make pull` has the model but no record of a run."""
    for record in ("models/run.json", "models/registration.json"):
        (clone.root / record).unlink()
    result = clone.run(*MAKE, "train")
    assert "no MLflow run recorded in models/run.json" in result.stderr
    run_id = clone.json("models/run.json")["run_id"]
    assert _client(clone).get_run(run_id).data.metrics["test_accuracy"] > 0.9
    assert clone.json("models/registration.json")["run_id"] == run_id
    assert _status(clone) == ""


def test_a_switch_to_a_tracking_server_records_the_run_there(clone: Repo, tmp_path: Path) -> None:
    """The README's team step after a local `make train`: MLFLOW_TRACKING_URI now names a real
    `mlflow server`; before, DVC found everything up to date and the summary named a champion
    of the local store while the server had no run."""
    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, env=clone.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    local_run = clone.json("models/run.json")["run_id"]
    saved_env = clone.env
    try:
        _wait_for(f"{base}/health", server)
        clone.env = {**saved_env, "MLFLOW_TRACKING_URI": base}
        result = clone.run(*MAKE, "train")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=base, registry_uri=base)
        run_id = clone.json("models/run.json")["run_id"]
        assert run_id != local_run
        assert client.get_run(run_id).data.metrics["test_accuracy"] > 0.9
        champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
        assert champion.run_id == run_id
        assert f"has no run {local_run}" in result.stderr
        assert f"({run_id})" in result.stdout and local_run not in result.stdout
        assert _status(clone) == ""
    finally:
        clone.env = saved_env
        _stop(server)
