"""End to end: `dvc repro` in a copy of the repository, on synthetic data, with a real MLflow store.

Asserts what a user looks at: the parameters and learning curves of the run, both confusion
matrices, the registered version and its `champion` alias, and that the champion loads and
predicts. Then: a second `dvc repro` does nothing, a worse model does not take the champion, and
a bad configuration fails before any MLflow run is left RUNNING.

The tests share one trained copy and run in any order: each starts from the copy as the first
`dvc repro` left it, workspace and MLflow store alike (see `repo`).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.repo_copy import MODEL_NAME, Repo, make_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Repo, Path]]:
    """The copy after its first `dvc repro`, and a snapshot of it.

    This process reads the store without a connection pool: `repo` puts a fresh copy of the
    store at the same path, and a pooled connection would go on reading the deleted file.
    """
    base = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        repo = make_repo(base / "repo", base / "mirror")
        repo.dvc("repro")
        snapshot = base / "after-first-repro"
        shutil.copytree(repo.root, snapshot, symlinks=True)
        yield repo, snapshot


@pytest.fixture
def repo(trained: tuple[Repo, Path]) -> Repo:
    """The copy as the first `dvc repro` left it, at the same path (MLflow keeps absolute
    artifact paths in the store): training a copy per test would take minutes, and DVC's run
    cache cannot undo the train and register stages (their uncached outputs keep them out)."""
    repo, snapshot = trained
    shutil.rmtree(repo.root)
    shutil.copytree(snapshot, repo.root, symlinks=True)
    return repo


def test_first_run_trains_evaluates_and_registers_a_champion(repo: Repo) -> None:
    run_id = repo.json("models/run.json")["run_id"]
    client = repo.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model._target_"] == "pipeline.core.estimator.SoftmaxRegression"
    assert run.data.tags["model"] == "softmax"
    assert float(params["model.learning_rate"]) == repo.params()["model"]["learning_rate"]
    assert params["data.val_size"] == "120"
    # Comparable runs: only the scalars that describe the run, no lists, URLs or checksums.
    assert len(params) <= 25
    assert not [key for key, value in params.items() if value.startswith("[")]
    assert {"data.seed", "mlflow.promotion.metric", "mlflow.promotion.min_improvement"} <= set(
        params)
    assert not [key for key in params if "md5" in key or "mirror" in key or "class_names" in key]
    note = run.data.tags["mlflow.note.content"]
    assert run.info.run_name in note and "softmax trained on" in note
    assert f"test_accuracy {run.data.metrics['test_accuracy']:.4f}" in note
    assert "version 1, promoted to `champion` on test_accuracy: no champion yet" in note
    experiment = client.get_experiment(run.info.experiment_id)
    assert "DVC pipeline" in experiment.tags["mlflow.note.content"]
    assert run.data.tags["source"] == "dvc"
    assert len(run.data.tags["git_commit"]) == 40
    assert run.data.tags["data_raw_md5"].endswith(".dir")
    assert run.data.tags["data_extra_md5"].endswith(".dir")

    epochs = repo.params()["model"]["epochs"]
    curve = client.get_metric_history(run_id, "epoch/val_loss")
    assert [m.step for m in curve] == list(range(1, epochs + 1))
    assert run.data.metrics["test_accuracy"] > 0.9  # the synthetic classes are separable
    assert {"val_accuracy", "test_f1_macro", "test_log_loss", "train_seconds"} <= set(
        run.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    for name in ("confusion_test.png", "confusion_test_normalized.png", "confusion_val.png",
                 "confusion_test.csv", "per_class_test.csv", "misclassified_test.png"):
        assert f"evaluation/{name}" in artifacts
    # MLflow's compare page compares only top-level files: the figures people compare are there.
    top = {a.path for a in client.list_artifacts(run_id) if not a.is_dir}
    assert {"confusion_test.png", "learning_curves.png"} <= top
    # The UI: the experiment opens on training runs; names lead with what differs, short enough
    # for the runs list; the champion's run carries the tag the runs list can show and filter.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name.startswith("lr") and len(run.info.run_name) <= 24
    assert run.data.tags["champion"] == "true"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [
        "fashion-mnist-train", "fashion-mnist-validation"]

    registration = repo.json("models/registration.json")
    assert registration["promoted"] and registration["champion_before"] is None
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.run_id == run_id
    assert champion.tags["run_id"] == run_id
    assert float(champion.tags["test_accuracy"]) == run.data.metrics["test_accuracy"]


def test_champion_loads_and_predicts(repo: Repo) -> None:
    import mlflow.pyfunc
    import mlflow.sklearn

    repo.client()
    with np.load(repo.root / "data" / "split" / "test.npz") as test:
        X, y = test["X"], test["y"]
    uri = f"models:/{MODEL_NAME}@champion"
    model = mlflow.sklearn.load_model(uri)
    assert np.mean(model.predict(X) == y) > 0.9
    assert np.allclose(model.predict_proba(X[:5]).sum(axis=1), 1.0)
    served = mlflow.pyfunc.load_model(uri).predict(X[:20], params={"top_k": 2})
    assert np.array_equal(served["class"], model.predict(X[:20]))
    assert np.allclose(served["probability"], model.predict_proba(X[:20]).max(axis=1))
    assert [len(row) for row in served["top_classes"]] == [2] * 20


def test_dvc_outputs_for_metrics_and_plots(repo: Repo) -> None:
    metrics = repo.dvc("metrics", "show", "--json").stdout
    assert "test" in metrics and "accuracy" in metrics
    shown = repo.dvc("plots", "show", "--json").stdout
    assert "Confusion matrix (test)" in shown
    predictions = (repo.root / "plots" / "predictions_test.csv").read_text().splitlines()
    assert predictions[0] == "actual,predicted,actual_label,predicted_label"
    assert len(predictions) == 201
    summary = repo.run(sys.executable, "-m", "pipeline.commands.summary").stdout
    assert "champion after" in summary and "version 1" in summary


def test_second_repro_changes_nothing(repo: Repo) -> None:
    client = repo.client()
    runs_before = len(client.search_runs([client.get_experiment_by_name("fashion-mnist")
                                          .experiment_id]))
    result = repo.dvc("repro")
    assert "didn't change" in result.stdout or "up to date" in result.stdout
    runs_after = len(client.search_runs([client.get_experiment_by_name("fashion-mnist")
                                         .experiment_id]))
    assert runs_after == runs_before
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1


def test_rerunning_register_registers_nothing_new(repo: Repo) -> None:
    repo.dvc("repro", "-f", "-s", "register")
    client = repo.client()
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"


def test_worse_model_does_not_take_the_champion(repo: Repo) -> None:
    params = repo.params()
    params["model"].update(learning_rate=1e-6, epochs=1)
    repo.write_params(params)
    repo.dvc("repro")
    client = repo.client()
    registration = repo.json("models/registration.json")
    assert not registration["promoted"]
    assert registration["candidate"]["version"] == "2"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(challenger.version) == "2"
    assert challenger.tags["promotion_decision"] == "kept champion"
    assert "champion" not in client.get_run(challenger.run_id).data.tags  # stays with the alias
    assert client.get_run(registration["champion_after"]["run_id"]).data.tags["champion"] == "true"


def test_hydra_sweep_registers_only_its_best_point_by_validation(repo: Repo) -> None:
    """`python -m pipeline.train -m ...`: every point trains and evaluates; the sweep's best
    point on validation, and only it, goes through the champion rule."""
    client = repo.client()
    before = len(client.search_model_versions(f"name='{MODEL_NAME}'"))
    result = repo.run(sys.executable, "-m", "pipeline.train", "-m",
                      "model.learning_rate=0.02,0.2,0.000001", "model.epochs=2",
                      "hydra.sweep.dir=multirun/sweep")
    experiment = client.get_experiment_by_name("fashion-mnist").experiment_id
    runs = client.search_runs([experiment], "tags.source = 'hydra'")
    assert sorted(run.data.params["model.learning_rate"] for run in runs) == [
        "0.02", "0.2", "1e-06"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "test_accuracy" in run.data.metrics and "val_accuracy" in run.data.metrics
        assert run.data.tags["hydra_overrides"].startswith("model.learning_rate=")
    registered = [run for run in runs if "registered_version" in run.data.tags]
    assert len(registered) == 1
    best = max(runs, key=lambda run: run.data.metrics["val_accuracy"])
    assert registered[0].info.run_id == best.info.run_id
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == before + 1
    assert "best point by validation accuracy" in result.stdout
    for point in ("0", "1", "2"):
        assert (repo.root / "multirun" / "sweep" / point / "metrics" / "evaluate.json").is_file()


def test_a_sweep_whose_points_all_fail_exits_non_zero(repo: Repo) -> None:
    client = repo.client()
    before = len(client.search_model_versions(f"name='{MODEL_NAME}'"))
    result = repo.run(sys.executable, "-m", "pipeline.train", "-m",
                      "model.learning_rate=1e30,1e31", "model.optimizer=sgd",
                      "model.lr_schedule=constant", "hydra.sweep.dir=multirun/diverging",
                      check=False)
    assert result.returncode == 1
    assert "every point of the sweep" in result.stderr and "nothing was registered" in (
        result.stderr)
    assert "Traceback" not in result.stderr
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == before


def test_a_direct_run_checks_what_the_validate_stage_checks(repo: Repo) -> None:
    """Cross-key checks too: a batch larger than the training set is refused, not trained."""
    client = repo.client()
    before = len(client.search_model_versions(f"name='{MODEL_NAME}'"))
    result = repo.run(sys.executable, "-m", "pipeline.train", "model.batch_size=100000000",
                      check=False)
    assert result.returncode == 1
    assert "model.batch_size=100000000 is invalid: the training set has" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == before


def test_dvc_exp_run_with_set_param_and_group_override(repo: Repo) -> None:
    client = repo.client()
    repo.dvc("exp", "run", "-S", "model.learning_rate=0.05")
    run = client.get_run(repo.json("models/run.json")["run_id"])
    assert run.data.params["model.learning_rate"] == "0.05"
    # The row of `dvc exp show` and its MLflow run carry the same experiment name.
    exp_name = run.data.tags["dvc_exp_name"]
    baseline = repo.run("git", "rev-parse", "HEAD").stdout.strip()
    assert run.data.tags["dvc_exp_baseline_rev"] == baseline
    assert f"DVC experiment `{exp_name}`" in run.data.tags["mlflow.note.content"]
    listed = repo.dvc("exp", "show", "--json").stdout
    assert f'"name": "{exp_name}"' in listed
    found = client.search_runs([run.info.experiment_id], f"tags.dvc_exp_name = '{exp_name}'")
    assert [r.info.run_id for r in found] == [run.info.run_id]
    repo.dvc("exp", "run", "-S", "model=sklearn_logreg", "-S", "model.max_iter=30")
    run = client.get_run(repo.json("models/run.json")["run_id"])
    assert run.data.tags["model"] == "sklearn_logreg"
    assert run.data.metrics["test_accuracy"] > 0.9
    shown = repo.dvc("exp", "show", "--json").stdout
    assert "make_logistic_regression" in shown and "0.05" in shown
    repo.run("git", "checkout", "--", "params.yaml")


def test_bad_config_fails_and_leaves_no_running_run(repo: Repo) -> None:
    params = repo.params()
    params["model"]["learning_rate"] = -1
    repo.write_params(params)
    result = repo.dvc("repro", check=False)
    assert result.returncode != 0
    assert "model.learning_rate=-1 is invalid" in result.stdout + result.stderr
    client = repo.client()
    experiment = client.get_experiment_by_name("fashion-mnist").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
