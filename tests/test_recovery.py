"""Failures leave a usable workspace: refused experiments, damaged files, killed stages.

All in one repository copy after a real `dvc repro` (synthetic data, real DVC, a real sqlite
MLflow store); each test leaves the copy working again, as a user following the messages would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.repo_copy import BIN, Repo, make_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    repo = make_repo(tmp_path_factory.mktemp("recovery-repo"),
                     tmp_path_factory.mktemp("recovery-mirror"))
    repo.dvc("repro")
    return repo


def _predict_with_the_model_file(repo: Repo) -> None:
    result = repo.run(sys.executable, "-m", "pipeline.predict",
                      "data/raw/t10k-images-idx3-ubyte.gz", "--model", "models/model.skops")
    assert "model models/model.skops" in result.stderr


@pytest.mark.parametrize("override, key", [
    ("model.learning_rate=nan", "model.learning_rate=nan"),
    ("data.val_size=599", "data.val_size=599"),  # 600 official images: one class left empty
    ("model.batch_size=100000000", "model.batch_size=100000000"),
])
def test_a_refused_experiment_deletes_nothing(repo: Repo, override: str, key: str) -> None:
    model = (repo.root / "models" / "model.skops").read_bytes()

    result = repo.dvc("exp", "run", "-S", override, check=False)

    assert result.returncode != 0
    assert key in result.stderr and "git checkout params.yaml" in result.stderr
    assert "make params" in result.stderr
    assert (repo.root / "models" / "model.skops").read_bytes() == model
    assert (repo.root / "data" / "split" / "train.npz").is_file()
    repo.run(sys.executable, "-m", "pipeline.commands.params")  # `make params`, as it says
    assert "Data and pipelines are up to date" in repo.dvc("status").stdout
    _predict_with_the_model_file(repo)


def test_a_damaged_model_file_names_the_remedy(repo: Repo) -> None:
    model = repo.root / "models" / "model.skops"
    os.truncate(model, model.stat().st_size // 2)

    result = repo.dvc("repro", "-s", "evaluate", check=False)

    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "evaluate: error: models/model.skops is not a readable skops model file" in \
        result.stderr
    assert "dvc checkout --force models/model.skops" in result.stderr
    assert "dvc repro -f train" in result.stderr
    repo.dvc("checkout", "--force", "models/model.skops")  # as the message says
    repo.dvc("repro", "-s", "evaluate")
    _predict_with_the_model_file(repo)


def test_a_damaged_store_names_the_file_and_how_to_recover(repo: Repo) -> None:
    store = repo.root / "mlflow.db"
    backup = repo.root.parent / "mlflow.db.backup"
    shutil.copy2(store, backup)
    os.truncate(store, store.stat().st_size // 2)

    result = repo.run(sys.executable, "-m", "pipeline.train", "model.epochs=1", check=False)

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "train: error: the MLflow store mlflow.db is damaged" in result.stderr
    assert "sqlite3 mlflow.db .recover" in result.stderr
    shutil.copy2(backup, store)  # restored from a backup, as the message says
    repo.run(sys.executable, "-m", "pipeline.train", "model.epochs=1")


def _running_runs(repo: Repo) -> list:
    return repo.client().search_runs(
        [repo.client().get_experiment_by_name("fashion-mnist").experiment_id],
        filter_string="attributes.status = 'RUNNING'")


def test_a_train_stage_killed_with_sigkill_leaves_no_run_running(repo: Repo) -> None:
    params = repo.params()
    params["model"]["epochs"] = 100_000
    params["model"]["early_stopping"] = False
    repo.write_params(params)
    stage = subprocess.Popen([str(BIN / "python"), "-m", "pipeline.stages.train"], cwd=repo.root,
                             env=repo.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _running_runs(repo) and time.monotonic() < deadline:
            assert stage.poll() is None, "the train stage ended on its own"
            time.sleep(0.5)
        [killed] = _running_runs(repo)
        assert killed.data.tags["pid"] == str(stage.pid)
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait(timeout=30)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
    repo.run("git", "checkout", "params.yaml")
    assert repo.client().get_run(killed.info.run_id).info.status == "RUNNING"

    repo.dvc("repro", "-f", "-s", "train")  # the next stage start finds the run's process gone

    run = repo.client().get_run(killed.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "killed"
    assert _running_runs(repo) == []
    repo.dvc("repro")
    _predict_with_the_model_file(repo)
