"""`python -m pipeline.tune` in a copy of the project: real Optuna storage, real MLflow store.

Synthetic data (tests/synthetic.py), a sqlite study store and a sqlite MLflow store inside the
copy; workers are real processes, one of them killed with SIGKILL in the middle of a trial.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import yaml

from tests.repo_copy import MODEL_NAME, Repo, make_repo

pytestmark = pytest.mark.slow
TUNE = (sys.executable, "-m", "pipeline.tune")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    repo = make_repo(tmp_path_factory.mktemp("repo"), tmp_path_factory.mktemp("mirror"))
    repo.dvc("repro", "split")
    return repo


def study(repo: Repo, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{repo.root / 'optuna.db'}")


def study_if_created(repo: Repo, name: str) -> list:
    """The study's trials once tune has created it, else []. Never creates the tables itself:
    optuna.load_study would, racing the tune process that is creating them (when this test runs
    first in the module, found in a random order, seed 2714833904)."""
    path = repo.root / "optuna.db"
    if not path.exists():
        return []
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}", skip_table_creation=True,
                                             skip_compatibility_check=True)
        return optuna.load_study(study_name=name, storage=storage).trials
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # not there yet, or tables half made
        return []


def runs_of(repo: Repo, name: str) -> tuple[list, list]:
    """(parent runs, child runs) of the Optuna study `name` in the copy's MLflow store."""
    client = repo.client()
    experiment = client.get_experiment_by_name("fashion-mnist")
    if experiment is None:  # nothing has run in the copy yet
        return [], []
    runs = client.search_runs([experiment.experiment_id], f"tags.optuna_study = '{name}'",
                              max_results=500)
    parents = [r for r in runs if r.data.tags.get("model") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def versions(repo: Repo) -> list:
    return repo.client().search_model_versions(f"name='{MODEL_NAME}'")


@dataclass
class FirstInvocation:
    """Study s1 as its first invocation left it (the resume test adds trials to it later)."""

    result: subprocess.CompletedProcess
    trials: list
    best: optuna.trial.FrozenTrial
    parents: list
    children: list
    versions_before: int
    versions_after: int


@pytest.fixture(scope="module")
def s1(repo: Repo) -> FirstInvocation:
    before = len(versions(repo))
    result = repo.run(*TUNE, "--trials", "6", "--workers", "2", "--study", "s1", "--seed", "0",
                      "model.epochs=3")
    first = study(repo, "s1")
    return FirstInvocation(result, first.trials, first.best_trial, *runs_of(repo, "s1"), before,
                           len(versions(repo)))


def test_two_workers_make_one_parent_run_with_a_child_per_trial(
        repo: Repo, s1: FirstInvocation) -> None:
    result, trials, parents, children = s1.result, s1.trials, s1.parents, s1.children
    assert len(trials) == 6
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    client = repo.client()
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    for child in children:
        trial = by_run[child.info.run_id]
        assert child.data.tags["optuna_state"] == trial.state.name
        assert float(child.data.params["model.learning_rate"]) == pytest.approx(
            trial.params["learning_rate"])
        assert client.get_metric_history(child.info.run_id, "epoch/val_loss")
        if trial.state.name == "COMPLETE":
            assert child.data.metrics["val_log_loss"] == pytest.approx(trial.value)
            confusion = client.download_artifacts(child.info.run_id,
                                                  "evaluation/confusion_val.csv")
            assert Path(confusion).read_text().startswith("actual \\ predicted,T-shirt/top")
        assert not client.list_artifacts(child.info.run_id, "model")  # trials log no model
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png",
            "optuna/parallel_coordinate.png", "optuna/best_model.yaml"} <= artifacts
    best_yaml = yaml.safe_load(Path(client.download_artifacts(
        parent.info.run_id, "optuna/best_model.yaml")).read_text())
    best = s1.best
    assert best_yaml["learning_rate"] == pytest.approx(best.params["learning_rate"])
    assert best_yaml["_target_"] == "pipeline.core.estimator.SoftmaxRegression"
    # Selected on validation, trained once more, offered to the champion rule once.
    assert s1.versions_after == s1.versions_before + 1
    retrained = client.get_run(parent.data.tags["best_run_id"])
    assert retrained.data.tags["optuna_trial"] == str(best.number)
    assert "test_accuracy" in retrained.data.metrics
    assert f"best trial {best.number}" in result.stdout
    # The parent run's description: the study, its best trial, what was registered.
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("Optuna study `s1`") and "6 trials" in note
    assert f"Best: trial {best.number}, val_log_loss {best.value:.4f}" in note
    assert f"({retrained.info.run_id}) and registered as {MODEL_NAME} version" in note
    assert all(c.info.run_name.startswith(f"trial {by_run[c.info.run_id].number}: lr")
               for c in children)


def test_a_second_invocation_resumes_the_study(repo: Repo, s1: FirstInvocation) -> None:
    before = len(versions(repo))
    trials, (parents, children) = len(study(repo, "s1").trials), runs_of(repo, "s1")
    repo.run(*TUNE, "--trials", "3", "--workers", "1", "--study", "s1", "model.epochs=3")
    assert len(study(repo, "s1").trials) == trials + 3
    parents_after, children_after = runs_of(repo, "s1")
    assert len(parents_after) == len(parents) + 1
    assert len(children_after) == len(children) + 3
    # Its best trial, offered once: a new version, or none when a version already holds the
    # same model bytes (on this tiny data a retrained best trial can equal an earlier model).
    after = versions(repo)
    assert len(after) in (before, before + 1)
    new_parent = next(p for p in parents_after if p.info.run_id not in
                      {q.info.run_id for q in parents})
    offered = int(new_parent.data.tags["registered_version"])
    assert offered in {int(v.version) for v in after}
    if len(after) == before:  # no new version: the one offered is an earlier one
        assert offered <= before


def test_pruned_and_diverged_trials_are_recorded_and_the_study_goes_on(repo: Repo) -> None:
    # A search file of one's own, chosen as a group option: good, hopeless and diverging rates.
    (repo.root / "conf" / "search" / "rates.yaml").write_text(yaml.safe_dump({
        "objective": "val_log_loss", "pruner": "median",
        "space": {"learning_rate": {"type": "categorical",
                                   "choices": [0.05, 0.04, 0.03, 0.02, 1e-7, 1e30]}}}))
    repo.run(*TUNE, "--trials", "14", "--workers", "1", "--study", "s2", "--seed", "3",
             "+search=rates", "model.optimizer=sgd", "model.lr_schedule=constant",
             "model.epochs=6")
    trials = study(repo, "s2").trials
    states = {t.state.name for t in trials}
    assert {"COMPLETE", "PRUNED", "FAIL"} <= states, " ".join(
        f"{t.number}:{t.state.name}:{t.params}" for t in trials)
    assert any(t.state.name == "PRUNED" and t.params["learning_rate"] == 1e-7 for t in trials)
    client = repo.client()
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        if trial.state.name == "PRUNED":
            # Not a crash: FINISHED, told apart by its tag (it was KILLED, a red cross).
            assert run.info.status == "FINISHED" and run.data.tags["optuna_state"] == "PRUNED"
            assert run.data.tags["pruned"] == "true"
            assert "lags the other trials" in run.data.tags["pruned_reason"]
        if trial.state.name == "FAIL":
            assert trial.params["learning_rate"] == 1e30
            assert run.info.status == "FAILED"
            assert "training diverged" in run.data.tags["failure_reason"]
            assert "training diverged" in trial.user_attrs["fail_reason"]


def test_a_killed_worker_leaves_a_failed_trial_and_the_study_goes_on(repo: Repo) -> None:
    process = subprocess.Popen([*TUNE, "--trials", "8", "--workers", "2", "--study", "s3",
                                # the search space sets epochs: long enough to catch a trial running
                                "search.space.epochs.low=200", "search.space.epochs.high=300",
                                "search.pruner=none"],
                               cwd=repo.root, env=repo.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.3)
            victim = next((t for t in study_if_created(repo, "s3")
                           if t.state.name == "RUNNING" and "worker" in t.user_attrs), None)
        assert victim is not None, "no trial started"
        host, pid = victim.user_attrs["worker"].rsplit(":", 1)
        os.kill(int(pid), signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert process.returncode == 0, stderr
    assert f"exited with -{signal.SIGKILL}" in stderr
    trials = study(repo, "s3").trials
    dead = next(t for t in trials if t.number == victim.number)
    assert dead.state.name == "FAIL"
    run = repo.client().get_run(dead.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "heartbeat" in run.data.tags["failure_reason"]
    assert sum(t.state.name == "COMPLETE" for t in trials) >= 4
    assert not [t for t in trials if t.state.name == "RUNNING"]


def test_a_bad_search_space_is_refused_before_anything_runs(repo: Repo) -> None:
    before = len(versions(repo))
    result = repo.run(*TUNE, "--study", "bad", "search.space.learning_rate.low=-1",
                      check=False)
    assert result.returncode == 1
    assert "tune: error: search.space.learning_rate.low=-1 is invalid" in result.stderr
    assert "Traceback" not in result.stderr
    assert runs_of(repo, "bad") == ([], [])
    assert len(versions(repo)) == before


def test_worker_seeds_differ_between_invocations_and_workers() -> None:
    """Two machines joining one study with the same --seed must not draw the same points."""
    from pipeline.commands.tune import worker_seed

    shared = {worker_seed(0, worker, 0, parent) for parent in ("run-a", "run-b")
              for worker in (0, 1)}
    assert len(shared) == 4
    # Even seeds that add up alike (seed 0 at 1 trial, seed 1 at 0 trials) differ when shared.
    assert worker_seed(0, 0, 1, "run-a") != worker_seed(1, 0, 0, "run-b")
    # On the embedded store a seeded invocation is reproducible.
    assert worker_seed(0, 1, 5) == worker_seed(0, 1, 5) == 1005
    assert worker_seed(None, 0, 0, "run-a") is None


def test_more_workers_than_cores_gets_a_warning(repo: Repo) -> None:
    cores = os.cpu_count() or 1
    result = repo.run(*TUNE, "--workers", str(cores + 1), "--study", "bad",
                      "search.space.learning_rate.low=-1", check=False)
    assert result.returncode == 1
    assert (f"tune: warning: --workers {cores + 1} is more than the {cores} cores of this "
            "machine") in result.stderr


def test_ctrl_c_stops_the_workers_with_one_line(repo: Repo) -> None:
    process = subprocess.Popen([*TUNE, "--trials", "8", "--workers", "2", "--study", "s-int",
                                # the search space sets epochs (model.epochs would be overridden):
                                # trials long enough that both workers are still in theirs
                                "search.space.epochs.low=4000", "search.space.epochs.high=5000",
                                "search.pruner=none"],
                               cwd=repo.root, env=repo.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        running = []
        while len(running) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.3)
            running = [t for t in study_if_created(repo, "s-int") if t.state.name == "RUNNING"]
        assert len(running) == 2, ("the workers did not start their trials", process.poll(),
                                   process.stderr.read() if process.poll() is not None else "")
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "failed with value" not in stderr, stderr  # Optuna's line per stopped trial
    assert stderr.count("tune: interrupted") == 1
    assert not [t for t in study(repo, "s-int").trials if t.state.name == "RUNNING"]
    parents, children = runs_of(repo, "s-int")
    assert [run.info.status for run in parents] == ["KILLED"]
    assert all(run.info.status != "RUNNING" for run in children)
