"""A registered version's identity (issue 17): its model digest is recorded, checked by every load,
and a byte-identical model is not registered twice. Each version also carries a model card.

A real sqlite store and registry, the pipeline's own model logging (skops), the real register
stage; predict in-process and `serve` as a process of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.estimator import SoftmaxRegression
from pipeline.support import config, model_files, model_integrity, model_loader
from pipeline.support.outputs import Outputs
from pipeline.support.registration_file import describe, registration_from_record
from tests.conftest import Archives
from tests.synthetic import (
    CLASS_NAMES,
    REPO_ROOT,
    data_params,
    default_section,
    make_dataset,
    make_images,
    write_params,
    write_png,
)

MODEL = "integrity-model"
SERVE_PORT = 17111  # this test's own port: serve must refuse before it binds anyway


@dataclass
class Store:
    root: Path
    uri: str
    params: Path
    cfg: config.Config


@pytest.fixture
def store(tmp_path: Path, archives: Archives, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A fresh sqlite store in `tmp_path`, with a params.yaml registering as MODEL."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    params = write_params(tmp_path / "params.yaml", data_params(archives.specs),
                          mlflow={**default_section("mlflow", "local"),
                                  "registered_model": MODEL})
    yield Store(tmp_path, uri, params, config.load(params))


def _estimator(seed: int) -> SoftmaxRegression:
    X, y = make_dataset(10, seed=seed)
    return SoftmaxRegression(epochs=3, random_state=seed).fit(X.reshape(len(X), -1), y)


def logged_run(estimator: SoftmaxRegression, test_accuracy: float) -> tuple[str, str]:
    """A finished run with the pipeline's logged model and its scores, as evaluate leaves it."""
    import mlflow

    from pipeline.support import pyfunc_model

    mlflow.set_experiment("fashion-mnist")
    with mlflow.start_run() as run:
        info = pyfunc_model.log_model(estimator, CLASS_NAMES)
        mlflow.log_metrics({"test_accuracy": test_accuracy, "test_f1_macro": test_accuracy,
                            "test_log_loss": 0.4, "val_accuracy": test_accuracy + 0.01})
        mlflow.log_params({"model.epochs": 3})
        mlflow.set_tags({"git_commit": "abc123", "git_dirty": "false",
                         "data_raw_md5": "raw", "split_manifest_md5": "split"})
    return run.info.run_id, info.model_uri


def register(store: Store, run: tuple[str, str], out: str) -> dict:
    from pipeline.stages import register as stage
    from pipeline.support.store import connect

    connect(store.cfg.mlflow)
    return stage.run(store.cfg, Outputs(store.root / out), *run)


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _model_file(version: str) -> Path:
    """The skops file of a version in the local store's artifact folder."""
    location = _client().get_model_version_download_uri(MODEL, version)
    folder = model_loader.registry_reader.local_folder(location)
    return folder / "model.skops"


def _swap(version: str, seed: int) -> tuple[str, str]:
    """Replace the version's model.skops by another valid skops model; (expected, found)."""
    path = _model_file(version)
    expected = model_integrity.model_digest(path.read_bytes())
    other = path.with_name("other.skops")
    model_files.save(_estimator(seed), other)
    os.replace(other, path)
    return expected, model_integrity.model_digest(path.read_bytes())


def _predict(store: Store, capsys: pytest.CaptureFixture, image: Path,
             model: str = f"models:/{MODEL}@champion") -> tuple[int, str, str]:
    from pipeline.commands import predict

    code = predict.main([str(image), "--model", model, "--params", str(store.params)])
    out, err = capsys.readouterr()
    return code, out, err


def test_registration_records_the_digest_of_the_evaluated_bytes(store: Store) -> None:
    estimator = _estimator(1)
    run = logged_run(estimator, 0.8)
    model_files.save(estimator, store.root / "a" / "models" / "model.skops")  # as train writes

    record = register(store, run, "a")

    version = _client().get_model_version(MODEL, "1")
    local = (store.root / "a" / "models" / "model.skops").read_bytes()
    assert version.tags["model_sha256"] == model_integrity.model_digest(local) == \
        record["model_sha256"]
    # The stored archive's own bytes differ (skops stamps them); its reproducible form does not.
    assert _model_file("1").read_bytes() != local


def test_a_model_file_other_than_the_evaluated_one_is_not_registered(store: Store) -> None:
    from pipeline.core.errors import PipelineError

    run = logged_run(_estimator(1), 0.8)
    model_files.save(_estimator(2), store.root / "a" / "models" / "model.skops")

    with pytest.raises(PipelineError, match="which the evaluate stage scored"):
        register(store, run, "a")
    assert _client().search_model_versions(f"name='{MODEL}'") == []


def test_a_replaced_model_file_is_refused_by_predict_in_one_line(
        store: Store, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    register(store, logged_run(_estimator(1), 0.8), "a")
    image = write_png(store.root / "coat.png", make_images([4], seed=3)[0])
    code, out, err = _predict(store, capsys, image)
    assert code == 0, err

    expected, found = _swap("1", seed=9)
    for reader in ("1", "0"):  # the direct registry reader, then MLflow's client
        monkeypatch.setenv("FMNIST_REGISTRY_READER", reader)
        code, out, err = _predict(store, capsys, image)

        assert code == model_loader.EXIT_MODEL and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"models:/{MODEL}@champion (version 1, run " in lines[0]
        assert f"SHA-256 is {found}, but the registry recorded {expected}" in lines[0]
    with pytest.raises(model_loader.ModelIntegrityError, match=found):
        model_loader.load_model(f"models:/{MODEL}/1", store.cfg.mlflow)


def test_a_replaced_model_file_is_refused_by_serve_in_one_line(store: Store) -> None:
    register(store, logged_run(_estimator(1), 0.8), "a")
    expected, found = _swap("1", seed=9)

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.commands.serve", "--port", str(SERVE_PORT),
         "--params", str(store.params)],
        cwd=store.root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})

    assert result.returncode == model_loader.EXIT_MODEL, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("serve: error: ") and "version 1" in lines[0]
    assert f"SHA-256 is {found}, but the registry recorded {expected}" in lines[0]


def test_a_version_registered_before_digests_loads_with_a_notice(
        store: Store, capsys: pytest.CaptureFixture) -> None:
    register(store, logged_run(_estimator(1), 0.8), "a")
    _client().delete_model_version_tag(MODEL, "1", "model_sha256")
    image = write_png(store.root / "coat.png", make_images([4], seed=3)[0])

    code, out, err = _predict(store, capsys, image)

    assert code == 0 and "coat.png" in out
    digest = model_integrity.model_digest(_model_file("1").read_bytes())
    assert f"has no model_sha256 tag (registered before model digests were recorded): its " \
           f"bytes cannot be verified (SHA-256 {digest}); loaded anyway" in err
    capsys.readouterr()
    model_loader.load_model(f"models:/{MODEL}/1", store.cfg.mlflow)
    assert capsys.readouterr().err.count("has no model_sha256 tag") == 1


def test_a_byte_identical_model_adds_no_version_and_the_summary_names_it(
        store: Store) -> None:
    from pipeline.support.summary_table import format_run_summary

    estimator = _estimator(1)
    first = register(store, logged_run(estimator, 0.8), "a")
    second = register(store, logged_run(estimator, 0.8), "b")  # another run, the same model
    register(store, logged_run(_estimator(2), 0.7), "c")

    versions = sorted(str(v.version) for v in _client().search_model_versions(f"name='{MODEL}'"))
    assert versions == ["1", "2"]
    assert first["same_bytes_as"] is None and second["same_bytes_as"] == "1"
    assert second["candidate"]["version"] == "1"
    line = describe(registration_from_record(second), changed=True).line
    assert line.endswith("no new version: version 1 already holds these model bytes")
    (store.root / "b" / "models" / "run.json").write_text('{"run_id": "x"}')
    assert "already registered as version 1: no new version" in format_run_summary(
        Outputs(store.root / "b"))


def test_a_version_has_a_card_few_tags_and_its_scores_as_model_metrics(store: Store) -> None:
    run_id, model_uri = logged_run(_estimator(1), 0.8)

    register(store, (run_id, model_uri), "a")

    client = _client()
    version = client.get_model_version(MODEL, "1")
    assert len(version.tags) <= 12, version.tags
    assert set(version.tags) >= {"run_id", "git_commit", "model_sha256", "test_accuracy",
                                 "promotion_decision", "promotion_reason"}
    assert "test_log_loss" not in version.tags and "val_accuracy" not in version.tags
    card = version.description
    assert card.startswith(f"# {MODEL} version 1\n")
    for section in ("## Data", "## Parameters", "## Scores", "## Promotion",
                    "## How to reproduce", "## Intended use and limits"):
        assert section in card
    assert "git checkout abc123" in card and version.tags["model_sha256"] in card
    # The rule it was judged by, whole: the metric, the test and its level, the margin.
    assert ("Promoted to `champion` on `test_accuracy` (exact McNemar test, alpha 0.05, "
            "min_improvement 0.0): ") in card
    logged = Path(client.download_artifacts(run_id, "model_card.md", str(store.root)))
    assert logged.read_text() == card
    metrics = {m.key: m.value for m in client.get_logged_model(
        model_uri.removeprefix("models:/")).metrics}
    assert metrics["test_accuracy"] == 0.8 and metrics["test_log_loss"] == 0.4
    assert np.isclose(metrics["val_accuracy"], 0.81)
