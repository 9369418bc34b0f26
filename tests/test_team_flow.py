"""Two clones sharing one team stack, and the pipeline when parts of the stack go away.

Clone A trains and pushes, then takes the path of `.github/workflows/retrain.yml` (make pull,
make retrain, make push, commit); clone B, a fresh clone of A, sources the same team.env, pulls,
and must find nothing to redo. Then the stack is stopped and restarted between two stages, and
the object store goes away during a push. Real PostgreSQL, SeaweedFS, mlflow server and DVC.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.team import postgres, supervisor
from tests.repo_copy import BIN, MAKE, Repo, make_repo
from tests.synthetic import REPO_ROOT
from tests.team_stack import Team

pytestmark = pytest.mark.slow
VENV = BIN.parent
MODEL = "fashion-mnist-softmax"


def make(repo: Repo, *targets: str, check: bool = True) -> subprocess.CompletedProcess:
    return repo.run(*MAKE, *targets, check=check)


def runs(team: Team) -> list:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(team.env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    experiment = client.get_experiment_by_name("fashion-mnist")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


@pytest.fixture(autouse=True)
def _team_client(team: Team, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process talks to the stack as a team member would, after `. team.env` (and not to
    the store an earlier module named with `mlflow.set_tracking_uri`, which the variable would
    not override)."""
    import mlflow

    for key, value in team.env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team.env["MLFLOW_TRACKING_URI"])
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def clones(team: Team, tmp_path_factory: pytest.TempPathFactory,
           ) -> tuple[Repo, Repo]:
    base = tmp_path_factory.mktemp("clones")
    a = make_repo(base / "a", base / "mirror")
    a.env = team.client_environment(a.env)
    # The first clone of a team: train and push (the README's steps).
    make(a, "train")
    make(a, "push")
    # A scheduled cycle: the workflow's steps, in its order (see tests/test_workflows.py).
    make(a, "pull")
    assert "nothing changed (champion version 1" in make(a, "retrain").stdout
    make(a, "push")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    a.run("git", "add", "-u")
    a.run(*git, "commit", "-qm", "Retrain")
    subprocess.run(["git", "clone", "-q", str(a.root), str(base / "b")], check=True)
    b = Repo(base / "b", base / "mirror")
    b.env = team.client_environment(b.env)
    return a, b


def test_a_second_clone_pulls_and_has_nothing_to_redo(
        team: Team, clones: tuple[Repo, Repo]) -> None:
    a, b = clones
    # `make` ran in the clones with this checkout's venv: its `pipeline` is still this checkout's
    imported = subprocess.run(
        [str(BIN / "python"), "-c", "import pipeline; print(pipeline.__file__)"], cwd="/",
        capture_output=True, text=True, check=True)
    assert Path(imported.stdout.strip()).is_relative_to(REPO_ROOT), imported.stdout
    # Other team tests may have added runs, some FAILED on purpose (a server killed mid-stage).
    status = {run.info.run_id: run.info.status for run in runs(team)}
    before = set(status)
    assert status[a.json("models/run.json")["run_id"]] == "FINISHED"
    pulled = make(b, "pull")
    assert f"DVC_REMOTE_URL={team.env['DVC_REMOTE_URL']}" in pulled.stdout
    repro = b.dvc("repro")
    assert "Data and pipelines are up to date" in repro.stdout, repro.stdout
    assert b.dvc("status").stdout.strip() == "Data and pipelines are up to date."
    assert {run.info.run_id for run in runs(team)} == before  # no new MLflow run
    committed = yaml.safe_load(a.run("git", "show", "HEAD:dvc.lock").stdout)  # what b cloned
    [model] = [out for out in committed["stages"]["train"]["outs"]
               if out["path"] == "models/model.skops"]
    assert hashlib.md5((b.root / "models" / "model.skops").read_bytes()).hexdigest() == (
        model["md5"])  # a's workspace may hold a later model: the restart tests retrain

    from mlflow.tracking import MlflowClient

    champion = MlflowClient().get_model_version_by_alias(MODEL, "champion")
    np.save(b.root / "images.npy", np.zeros((2, 28, 28), dtype=np.uint8))
    predicted = b.run(str(BIN / "python"), "-m", "pipeline.predict", "images.npy")
    assert f"models:/{MODEL}@champion (version {champion.version}, run {champion.run_id})" \
        in predicted.stderr, predicted.stderr
    assert len(predicted.stdout.splitlines()) == 1 + 2  # a header, one line per image
    assert champion.run_id in before


def test_a_stack_restarted_between_stages_resumes_and_keeps_everything(
        team: Team, clones: tuple[Repo, Repo], tmp_path: Path) -> None:
    """`make team-down` / `make team-up` in the middle of a pipeline: the next stage fails fast
    and clearly, the rerun finishes the same run, and the runs, versions, artifacts and DVC
    objects of before are all still there."""
    import mlflow
    from mlflow.tracking import MlflowClient

    a, b = clones
    params = a.params()
    params["model"]["learning_rate"] = params["model"]["learning_rate"] * 0.5
    a.write_params(params)
    a.dvc("repro", "train")
    run_id = a.json("models/run.json")["run_id"]
    versions_before = {v.version for v in MlflowClient().search_model_versions(f"name='{MODEL}'")}

    team.command("down")
    failed = a.dvc("repro", check=False, timeout=60)  # not MLflow's minutes of retries
    assert failed.returncode != 0
    assert f"cannot reach the MLflow tracking server {team.env['MLFLOW_TRACKING_URI']}" in \
        failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr

    up = team.command("up")
    assert "postgres: started" in up.stdout and "mlflow: started" in up.stdout
    a.dvc("repro")
    assert a.json("models/run.json")["run_id"] == run_id  # resumed, not retrained
    mlflow.set_tracking_uri(team.env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not [run.info.run_id for run in runs(team) if run.info.status == "RUNNING"]
    versions = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
    assert versions_before < versions
    # Artifacts written before the restart still load, through the server's proxy.
    first = min(versions, key=int)
    model = mlflow.sklearn.load_model(f"models:/{MODEL}/{first}")
    assert model.predict(np.zeros((1, 784), dtype=np.float32)).shape == (1,)
    # The DVC objects pushed before the restart (all that clone B's commit names) are still in
    # the remote: B fetches every one of them (B's remote set as `make pull` sets it, whether or
    # not B has pulled yet).
    from pipeline.support.workspace import configure_env_remote

    configure_env_remote(b.root, b.env)
    b.dvc("fetch")
    assert b.dvc("status", "--cloud").stdout.strip() == "Cache and remote 'env' are in sync."


def test_postgres_restarted_between_stages_costs_nothing(
        team: Team, clones: tuple[Repo, Repo]) -> None:
    a, _ = clones
    params = a.params()
    params["model"]["learning_rate"] = params["model"]["learning_rate"] * 0.5
    a.write_params(params)
    a.dvc("repro", "train")
    data, log = postgres.dirs(team.stack)
    # -l: the restarted server must not inherit (and hold open) this test's pipes.
    pg_ctl = str(postgres.binaries() / "pg_ctl")
    subprocess.run(postgres.as_postgres([pg_ctl, "restart", "-D", str(data), "-l", str(log),
                                         "-m", "fast", "-w"]),
                   check=True, capture_output=True, timeout=120)
    run_id = a.json("models/run.json")["run_id"]
    result = a.dvc("repro", check=False)
    if result.returncode != 0:  # a clear failure, and the rerun finishes the job
        assert "Traceback" not in result.stderr, result.stderr
        a.dvc("repro")
    assert a.json("models/run.json")["run_id"] == run_id  # the same run, finished
    assert [run.info.status for run in runs(team) if run.info.run_id == run_id] == ["FINISHED"]
    assert not [run.info.run_id for run in runs(team) if run.info.status == "RUNNING"]


def test_an_object_store_down_during_push_loses_nothing(
        team: Team, clones: tuple[Repo, Repo]) -> None:
    a, _ = clones
    params = a.params()  # a model not pushed yet
    params["model"]["learning_rate"] = params["model"]["learning_rate"] * 0.5
    a.write_params(params)
    a.dvc("repro", "train")
    assert a.dvc("status", "--cloud").stdout.strip() != "Cache and remote 'env' are in sync."
    supervisor.stop_group(team.state, "seaweedfs")
    try:
        started = time.monotonic()
        failed = make(a, "push", check=False)
        seconds = time.monotonic() - started
    finally:
        team.command("up")
    assert failed.returncode != 0
    assert "push: error: dvc push exited with code" in failed.stderr, failed.stderr
    assert "nothing is lost" in failed.stderr and "rerun `make push`" in failed.stderr
    assert team.env["DVC_REMOTE_URL"] in failed.stderr
    make(a, "push")
    assert "in sync" in a.dvc("status", "--cloud").stdout
    print(f"push with the object store down failed after {seconds:.1f} s")


def _object_key(md5: str) -> str:
    """Where DVC 3 keeps an object in the `dvc` bucket (DVC_REMOTE_URL s3://dvc/fashion-mnist)."""
    return f"fashion-mnist/files/md5/{md5[:2]}/{md5[2:]}"


def test_a_corrupted_or_substituted_object_is_refused_on_pull(
        team: Team, clones: tuple[Repo, Repo], tmp_path: Path) -> None:
    import boto3
    import skops.io
    from sklearn.linear_model import LogisticRegression

    a, _ = clones
    committed = yaml.safe_load(a.run("git", "show", "HEAD:dvc.lock").stdout)
    outs = {out["path"]: out["md5"] for stage in committed["stages"].values()
            for out in stage.get("outs", []) + stage.get("deps", [])
            if not out["md5"].endswith(".dir")}
    model_key, train_key = (_object_key(outs["models/model.skops"]),
                            _object_key(outs["data/split/train.npz"]))
    env = team.env
    s3 = boto3.client("s3", endpoint_url=env["DVC_REMOTE_ENDPOINT_URL"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    originals = {key: s3.get_object(Bucket="dvc", Key=key)["Body"].read()
                 for key in (model_key, train_key)}
    other = LogisticRegression().fit([[0.0], [1.0]], [0, 1])  # a valid model, another one
    flipped = bytearray(originals[train_key])
    flipped[len(flipped) // 2] ^= 0x01
    s3.put_object(Bucket="dvc", Key=model_key, Body=skops.io.dumps(other))
    s3.put_object(Bucket="dvc", Key=train_key, Body=bytes(flipped))
    try:
        subprocess.run(["git", "clone", "-q", str(a.root), str(tmp_path / "c")], check=True)
        c = Repo(tmp_path / "c", a.root.parent / "mirror")
        c.env = team.client_environment(c.env)
        started = time.monotonic()
        pulled = make(c, "pull", check=False)
        seconds = time.monotonic() - started
    finally:
        for key, body in originals.items():
            s3.put_object(Bucket="dvc", Key=key, Body=body)
    assert pulled.returncode != 0, pulled.stdout
    [error] = [line for line in pulled.stderr.splitlines() if line.startswith("pull: error: ")]
    assert "data/split" in error and "models/model.skops" in error, error
    assert "does not match its hash" in error
    assert not (c.root / "models" / "model.skops").exists()
    assert not (c.root / "data" / "split" / "train.npz").exists()
    # Everything else landed and matches dvc.lock.
    for path, md5 in outs.items():
        if path not in ("models/model.skops", "data/split/train.npz") and (
                c.root / path).is_file() and not path.startswith("pipeline/"):
            assert hashlib.md5((c.root / path).read_bytes()).hexdigest() == md5, path
    # The store repaired, the same clone pulls everything.
    make(c, "pull")
    assert hashlib.md5((c.root / "models" / "model.skops").read_bytes()).hexdigest() == (
        outs["models/model.skops"])
    print(f"make pull refusing two objects took {seconds:.1f} s")


def test_a_server_that_dies_during_evaluate_gets_one_line_and_the_rerun_finishes(
        team: Team, clones: tuple[Repo, Repo]) -> None:
    import os
    import signal

    from mlflow.tracking import MlflowClient

    a, _ = clones
    params = a.params()
    params["model"]["learning_rate"] = params["model"]["learning_rate"] * 0.25
    a.write_params(params)
    a.dvc("repro", "train")
    run_id = a.json("models/run.json")["run_id"]
    client = MlflowClient()
    evaluate = subprocess.Popen([str(BIN / "python"), "-m", "pipeline.stages.evaluate"],
                                cwd=a.root, env=a.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Once evaluate owns the run (it tags it with its pid), freeze it, kill the server
        # outright, and let evaluate go on: its next request meets a dead server.
        deadline = time.monotonic() + 120
        while client.get_run(run_id).data.tags.get("pid") != str(evaluate.pid):
            assert evaluate.poll() is None, evaluate.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(evaluate.pid, signal.SIGSTOP)
        os.killpg(supervisor.pid(team.state, "mlflow"), signal.SIGKILL)
        os.killpg(evaluate.pid, signal.SIGCONT)
        _, stderr = evaluate.communicate(timeout=180)
    finally:
        if evaluate.poll() is None:
            os.killpg(evaluate.pid, signal.SIGKILL)
            evaluate.wait()
        team.command("up")
    assert evaluate.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate: error: cannot reach the MLflow tracking server "
                           f"{team.env['MLFLOW_TRACKING_URI']} ("), stderr
    assert "make team-up" in last
    # The rerun finishes the same run.
    a.dvc("repro")
    assert a.json("models/run.json")["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
