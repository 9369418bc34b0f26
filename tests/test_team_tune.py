"""Two clones tuning at once share one Optuna study in the team stack's PostgreSQL.

Real PostgreSQL, SeaweedFS and mlflow server (the session stack of tests/team_stack.py); each
clone runs `python -m pipeline.tune` as its own process with the variables of team.env, as two
machines would. The study's role reaches the study database only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import optuna
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from pipeline.team.settings import OPTUNA_DATABASE
from tests.repo_copy import Repo, make_repo
from tests.team_stack import Team

pytestmark = pytest.mark.slow
STUDY = "team-shared"
# Its own experiment and model, so the other team tests' counts of runs and versions hold.
EXPERIMENT, MODEL = "fashion-mnist-team-tune", "fashion-mnist-team-tune"
ROLE = "fmnist_optuna"


def postgres_url(url: str, database: str) -> str:
    """`url` (SQLAlchemy's form) as a libpq URL for `database`."""
    return make_url(url).set(drivername="postgresql", database=database).render_as_string(
        hide_password=False)


def test_an_older_stack_gets_the_study_database_on_the_next_up(team: Team) -> None:
    # A stack made before the study database existed: no role, no database, no secret.
    stack = team.stack
    with psycopg.connect(stack.database_url("postgres", "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(OPTUNA_DATABASE)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ROLE)))
    settings = json.loads((team.state / "stack.json").read_text())
    del settings["secrets"][f"{ROLE}_password"]
    (team.state / "stack.json").write_text(json.dumps(settings))

    result = team.command("up")
    assert "postgres: already running" in result.stdout
    url = team.env["OPTUNA_STORAGE"]
    assert url.startswith(f"postgresql+psycopg://{ROLE}:")
    assert url.endswith(f"/{OPTUNA_DATABASE}")
    password = make_url(url).password
    assert password and password not in result.stdout + result.stderr
    assert json.loads((team.state / "stack.json").read_text())["secrets"][
        f"{ROLE}_password"] == password
    # `up` made Optuna's tables: the role reaches them with the password of team.env.
    with psycopg.connect(postgres_url(url, OPTUNA_DATABASE), connect_timeout=10) as conn:
        assert conn.execute("SELECT count(*) FROM studies").fetchone() == (0,)


@pytest.fixture(scope="module")
def clones(team: Team, tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Repo]:
    base = tmp_path_factory.mktemp("tune-clones")
    found = []
    for name in ("a", "b"):
        repo = make_repo(base / name, base / f"mirror-{name}")
        repo.dvc("repro", "split")
        repo.env = team.client_environment(repo.env)
        found.append(repo)
    return found[0], found[1]


def test_two_clones_tuning_at_once_share_one_study(team: Team, clones: tuple[Repo, Repo]) -> None:
    command = [sys.executable, "-m", "pipeline.tune", "--trials", "3", "--workers", "1",
               "--study", STUDY, "--seed", "0", "model.epochs=3", "search.space.epochs.high=4",
               f"mlflow.experiment={EXPERIMENT}", f"mlflow.registered_model={MODEL}"]
    # The same --seed on both machines: each invocation mixes it with its own parent run id, so
    # the two still draw different points (asserted below).
    processes = [subprocess.Popen(command, cwd=repo.root, env=repo.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
                 for repo in clones]
    try:
        outputs = [process.communicate(timeout=600) for process in processes]
    finally:  # on a timeout or a failure, no tuner or worker outlives the test
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    url = team.env["OPTUNA_STORAGE"]
    for stdout, stderr in outputs:
        assert make_url(url).password not in stdout + stderr  # the URL is logged redacted

    trials = optuna.load_study(study_name=STUDY, storage=url).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(6))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no trial twice
    parents_of_trials = {t.user_attrs["parent_run_id"] for t in trials}

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(team.env["MLFLOW_TRACKING_URI"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_USERNAME", team.env["MLFLOW_TRACKING_USERNAME"])
        env.setenv("MLFLOW_TRACKING_PASSWORD", team.env["MLFLOW_TRACKING_PASSWORD"])
        client = MlflowClient()
        experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
        parents = client.search_runs(
            [experiment], f"tags.optuna_study = '{STUDY}' and tags.model = 'study'")
    assert len(parents) == 2
    assert {run.info.run_id for run in parents} == parents_of_trials
    assert all(run.info.status == "FINISHED" for run in parents)
    assert all(":***@" in run.data.tags["optuna_storage"] for run in parents)


def test_the_study_role_cannot_reach_mlflow_s_database(team: Team) -> None:
    url = team.env["OPTUNA_STORAGE"]
    with psycopg.connect(postgres_url(url, OPTUNA_DATABASE), connect_timeout=10):
        pass  # its own database: yes
    for database in ("mlflow", "registry_lock", "postgres"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(postgres_url(url, database), connect_timeout=10)
