"""Same code, parameters and data, same bytes: every output DVC caches, and the model file.

DVC caches a new copy of any output whose bytes change, and `dvc.lock` can only show that a
clone reproduced the committed model if the model file is byte-identical. Trainings here run in
separate processes, so nothing that varies per process (memory addresses, clocks) can hide.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.support import model_files, model_loader
from tests.repo_copy import Repo, make_repo
from tests.synthetic import REPO_ROOT

SAVE_IN_A_NEW_PROCESS = """
import json
import sys
import numpy as np
from pipeline.support import estimators, model_files
rng = np.random.default_rng(0)
X = rng.integers(0, 256, size=(300, 784), dtype=np.uint8)
y = np.repeat(np.arange(10, dtype=np.uint8), 30)
model = estimators.build(json.loads(sys.argv[2]))
estimators.fit(model, X, y, X[:50], y[:50])
model_files.save(model, sys.argv[1])
"""

KINDS = ["softmax", "sklearn_logreg"]  # the config groups of conf/model/


def _save_in_new_process(path: Path, kind: str) -> bytes:
    """Fit the config group's model on small random images in a new process; the file's bytes."""
    spec = yaml.safe_load((REPO_ROOT / "conf" / "model" / f"{kind}.yaml").read_text())
    if "epochs" in spec:
        spec["epochs"] = 2
    subprocess.run([sys.executable, "-c", SAVE_IN_A_NEW_PROCESS, str(path), json.dumps(spec)],
                   cwd=REPO_ROOT, check=True)
    return path.read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_model_file_is_byte_identical_across_processes(tmp_path: Path, kind: str) -> None:
    first = _save_in_new_process(tmp_path / "a.skops", kind)
    second = _save_in_new_process(tmp_path / "b.skops", kind)
    assert first == second
    with zipfile.ZipFile(tmp_path / "a.skops") as archive:
        infos = archive.infolist()
    assert [info.filename for info in infos] == sorted(info.filename for info in infos)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.compress_type for info in infos} == {zipfile.ZIP_STORED}


@pytest.mark.slow
def test_reproducible_model_file_loads_with_skops_and_mlflow(tmp_path: Path) -> None:
    """The rewritten archive is still a skops file: skops and MLflow's loader both read it."""
    import mlflow.sklearn
    import skops.io

    _save_in_new_process(tmp_path / "model.skops", "softmax")
    path = tmp_path / "model.skops"
    assert sorted(skops.io.get_untrusted_types(file=path)) == sorted(model_files.TRUSTED_TYPES)
    loaded = skops.io.load(path, trusted=model_files.TRUSTED_TYPES)
    X = np.random.default_rng(1).integers(0, 256, size=(20, 784), dtype=np.uint8)
    expected = loaded.predict_proba(X)
    assert np.array_equal(model_loader.load(path).predict_proba(X), expected)

    # An MLflow model directory whose model file is the reproducible archive.
    mlflow_dir = tmp_path / "mlflow-model"
    mlflow.sklearn.save_model(loaded, str(mlflow_dir), serialization_format="skops",
                              skops_trusted_types=model_files.TRUSTED_TYPES)
    (mlflow_dir / "model.skops").write_bytes(path.read_bytes())
    from_mlflow = mlflow.sklearn.load_model(str(mlflow_dir))
    assert np.array_equal(from_mlflow.predict_proba(X), expected)


def _cached_outputs(root: Path) -> list[str]:
    """Every `outs` path of dvc.yaml that DVC caches (not `cache: false`)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            path, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if options.get("cache", True):
                paths.append(path)
    return paths


def _digests(root: Path, paths: list[str]) -> dict[str, str]:
    """MD5 of every file under the given outputs, by path relative to the repository."""
    files = {}
    for path in paths:
        target = root / path
        for file in sorted(target.rglob("*")) if target.is_dir() else [target]:
            if file.is_file():
                files[str(file.relative_to(root))] = hashlib.md5(file.read_bytes()).hexdigest()
    return files


def _locked_outputs(repo: Repo) -> dict[str, str]:
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])}


@pytest.mark.slow
def test_two_trainings_give_identical_bytes_for_every_cached_output(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", tmp_path / "mirror")
    repo.dvc("repro")
    cached = _cached_outputs(repo.root)
    assert {"models/model.skops", "reports/learning_curves.png", "reports/evaluation",
            "plots/predictions_test.csv", "data/split"} <= set(cached)
    before, locked_before = _digests(repo.root, cached), _locked_outputs(repo)
    first_run = repo.json("models/run.json")["run_id"]

    repo.dvc("repro", "--force")  # every stage again, each in a new process

    assert repo.json("models/run.json")["run_id"] != first_run  # a second training did happen
    after, locked_after = _digests(repo.root, cached), _locked_outputs(repo)
    assert after == before
    assert {p: locked_after[p] for p in cached} == {p: locked_before[p] for p in cached}
    # The history has no wall time either, so `dvc plots diff` shows no change.
    assert "seconds" not in (repo.root / "plots/history.csv").read_text().splitlines()[0]
