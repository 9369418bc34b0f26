"""`make runs`: the recent training runs as a terminal table, the champion marked, on a real
MLflow store filled by a real `dvc repro` and a direct Hydra run."""

from __future__ import annotations

import sys

import pytest

from tests.repo_copy import MAKE, MODEL_NAME, make_repo

pytestmark = pytest.mark.slow


def test_make_runs_lists_recent_runs_newest_first_with_the_champion(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = make_repo(tmp_path_factory.mktemp("runs-repo"), tmp_path_factory.mktemp("runs-mirror"))
    empty = repo.run(*MAKE, "runs", check=False)
    assert empty.returncode != 0 and "run `make train`" in empty.stderr
    repo.dvc("repro")
    first = repo.json("models/run.json")
    # A worse model (version 2, not promoted), as a direct Hydra run.
    repo.run(sys.executable, "-m", "pipeline.train", "model.epochs=1",
             "model.learning_rate=1e-6")
    client = repo.client()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.run_id == first["run_id"]

    result = repo.run(*MAKE, "runs")

    lines = result.stdout.splitlines()
    assert lines[0].split() == ["started", "run", "status", "val", "acc", "test", "acc",
                                "version", "id"]
    newest, oldest = lines[2], lines[3]
    assert "lr1e-06 ep1" in newest and " 2 " in newest and "*" not in newest
    run = client.get_run(first["run_id"])
    assert first["run_name"] in oldest and first["run_id"][:8] in oldest
    assert f"{run.data.metrics['val_accuracy']:.4f}" in oldest
    assert f"{run.data.metrics['test_accuracy']:.4f}" in oldest
    assert " 1 * " in oldest and "finished" in oldest
    assert lines[4].startswith("2 most recent runs") and "version 1" in lines[4]
    assert max(len(line) for line in lines[:4]) <= 120
    limited = repo.run(*MAKE, "runs", "LIMIT=1").stdout.splitlines()
    assert len(limited) == 4 and "lr1e-06" in limited[2]
