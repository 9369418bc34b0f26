"""The team stack itself: idempotent start, private settings, loopback only, auth, fail fast."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.repo_copy import BIN, MAKE, Repo, make_repo
from tests.synthetic import REPO_ROOT
from tests.team_stack import Team, http_status

pytestmark = pytest.mark.slow
VENV = BIN.parent


def test_up_again_starts_nothing_and_team_env_is_private(team: Team) -> None:
    result = team.command("up")
    assert "postgres: already running" in result.stdout
    assert "seaweedfs: already running" in result.stdout
    assert "mlflow: already running" in result.stdout
    assert stat.S_IMODE(team.env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((team.state / "stack.json").stat().st_mode) == 0o600
    env = team.env
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_REQUEST_CHECKSUM_CALCULATION",
                "FMNIST_REGISTRY_LOCK_URL", "OPTUNA_STORAGE"):
        assert env[key], key
    status = team.command("status")
    assert [line.split(":")[0] for line in status.stdout.splitlines()] == [
        "postgres", "seaweedfs", "mlflow"]
    assert all(": running - " in line for line in status.stdout.splitlines())


def test_team_env_and_state_are_ignored_by_git(tmp_path: Path) -> None:
    ignored = subprocess.run(["git", "check-ignore", "team.env", ".team/stack.json"],
                             cwd=REPO_ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == ["team.env", ".team/stack.json"]


def test_nothing_listens_beyond_loopback(team: Team) -> None:
    ports = set(team.stack.ports.values())
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True)
    ours = [line.split()[3] for line in listening.stdout.splitlines()
            if int(line.split()[3].rsplit(":", 1)[1]) in ports]
    assert len(ours) >= 3  # postgres, mlflow, S3 at least
    assert all(address.startswith("127.0.0.1:") for address in ours), ours


def test_the_server_wants_credentials(team: Team) -> None:
    env = team.env
    url = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(url) == 401
    assert http_status(url, "admin", "wrong") == 401
    assert http_status(url, env["MLFLOW_TRACKING_USERNAME"],
                       env["MLFLOW_TRACKING_PASSWORD"]) == 200


def test_a_read_only_user_loads_the_champion_but_cannot_move_or_delete(
        team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tests.test_register import evaluated_run, params_for_model

    name = "read-only-check"
    params = params_for_model(tmp_path / "params.yaml", name)
    for key, value in team.env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team.env["MLFLOW_TRACKING_URI"])
    admin = MlflowClient()
    admin.create_registered_model(name)
    for accuracy in (0.7, 0.8):
        run_id, uri = evaluated_run(accuracy)
        admin.create_model_version(name, uri, run_id=run_id, model_id=uri.split("/")[-1])
    admin.set_registered_model_alias(name, "champion", "2")

    made = subprocess.run(
        ["make", "--no-print-directory", f"VENV={VENV}", "team-user", "NAME=reader",
         "PERMISSION=READ",
         f"TEAM_ARGS=--state {team.state} --env-file {team.env_file} --params {params}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    user_file = team.state / "users" / "reader.env"
    assert str(user_file) in made.stdout
    assert stat.S_IMODE(user_file.stat().st_mode) == 0o600
    from tests.team_stack import read_env_file

    reader_env = read_env_file(user_file)
    assert reader_env["MLFLOW_TRACKING_USERNAME"] == "reader"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader_env["MLFLOW_TRACKING_PASSWORD"])
    reader = MlflowClient()
    model = mlflow.sklearn.load_model(f"models:/{name}@champion")
    assert model.predict([[3.0]]).tolist() == [1]
    _the_rest_reader_agrees_with_mlflow(team, reader, name, tmp_path)
    for forbidden in (lambda: reader.set_registered_model_alias(name, "champion", "1"),
                      lambda: reader.delete_model_version(name, "2"),
                      lambda: reader.delete_registered_model_alias(name, "champion")):
        with pytest.raises(MlflowException) as refused:
            forbidden()
        assert refused.value.error_code == "PERMISSION_DENIED"
    with pytest.raises(MlflowException) as refused:  # what a READ user's `make train` meets
        reader.create_run(admin.get_experiment_by_name("fashion-mnist").experiment_id)
    from pipeline.support import errors

    explained = errors.explain(refused.value)
    assert explained.startswith("the MLflow tracking server refused user 'reader' this change")
    assert "make team-user NAME=reader PERMISSION=EDIT" in explained
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team.env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.env["MLFLOW_TRACKING_PASSWORD"])
    assert admin.get_model_version_by_alias(name, "champion").version == "2"
    assert len(admin.search_model_versions(f"name='{name}'")) == 2


def _the_rest_reader_agrees_with_mlflow(team: Team, client, name: str, tmp_path: Path) -> None:
    """What `predict` reads without MLflow's client (registry_reader) is what MLflow reads."""
    import mlflow.artifacts

    from pipeline.support import model_loader, registry_reader

    rest = registry_reader.open_registry(team.env["MLFLOW_TRACKING_URI"])
    assert isinstance(rest, registry_reader.RestRegistry)
    assert rest.aliases(name) == {"champion": "2"}
    assert rest.aliases("no-such-model") is None
    assert rest.versions(name) == [1, 2]
    assert rest.version(name, "9") is None
    record = rest.version(name, "2")
    assert record.run_id == client.get_model_version(name, "2").run_id
    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/2",
                                                          dst_path=str(tmp_path)))
    for file in ("MLmodel", "model.skops"):
        assert record.read(file, 1 << 20) == (downloaded / file).read_bytes()
    loaded = model_loader.load_model_files(record.read, f"models:/{name}/2")
    assert loaded.predict([[3.0]]).tolist() == [1]


@pytest.fixture(scope="module")
def offline_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A copy of the project whose tracking URI points at a port where nothing listens."""
    base = tmp_path_factory.mktemp("offline")
    repo = make_repo(base / "repo", base / "mirror")
    repo.env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
    # The image `predict` is given in DOWN_COMMANDS, for every test of the module in any order.
    np.save(repo.root / "x.npy", np.zeros((1, 28, 28), dtype=np.uint8))
    return repo


DOWN_COMMANDS = {
    "make train": [*MAKE, "train"],
    "dvc repro": [str(BIN / "dvc"), "repro"],
    "python -m pipeline.train": [sys.executable, "-m", "pipeline.train"],
    "python -m pipeline.train -m": [sys.executable, "-m", "pipeline.train", "-m",
                                    "model.learning_rate=0.1,0.2"],
    "make retrain": [*MAKE, "retrain"],
    "python -m pipeline.predict": [sys.executable, "-m", "pipeline.predict", "x.npy"],
    "make serve": [*MAKE, "serve"],
}


@pytest.mark.parametrize("command", list(DOWN_COMMANDS))
def test_a_server_that_is_down_fails_every_command_at_once(
        offline_repo: Repo, command: str) -> None:
    # MLflow's own retries would take minutes: past 60 s the command fails the test (a guard
    # against hanging, not a timing; the README's seconds were measured by hand).
    result = offline_repo.run(*DOWN_COMMANDS[command], check=False, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "cannot reach the MLflow tracking server http://127.0.0.1:9" in output, output
    assert "Traceback" not in output, output
    # Nothing half-written: no model saved, no record of a new run (DVC removes the outputs
    # of a stage it is about to run, so the committed run.json may be gone, never replaced).
    assert not (offline_repo.root / "models" / "model.skops").exists()
    run_file = offline_repo.root / "models" / "run.json"
    assert not run_file.exists() or json.loads(run_file.read_text()) == json.loads(
        (REPO_ROOT / "models" / "run.json").read_text())


@pytest.mark.parametrize(("user", "password", "named"), [
    (None, None, "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not both set"),
    ("admin", "wrong", "the password of user 'admin' was refused"),
])
def test_wrong_or_missing_credentials_name_the_variables(
        team: Team, offline_repo: Repo, user: str | None, password: str | None,
        named: str) -> None:
    env = team.client_environment(offline_repo.env)
    env.pop("MLFLOW_TRACKING_USERNAME")
    env.pop("MLFLOW_TRACKING_PASSWORD")
    if user is not None:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    for command in (DOWN_COMMANDS["dvc repro"], DOWN_COMMANDS["python -m pipeline.predict"]):
        result = subprocess.run(command, cwd=offline_repo.root, env=env, capture_output=True,
                                text=True, timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert named in output and "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" \
            in output, output
        assert "Traceback" not in output, output


def test_a_member_added_again_gets_a_new_password_and_the_new_permission(
        team: Team, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second `team user` takes the paths where the user and the grants already exist."""
    from mlflow.tracking import MlflowClient

    from tests.team_stack import read_env_file

    url = team.env["MLFLOW_TRACKING_URI"]
    probe = url + "/api/2.0/mlflow/experiments/search?max_results=1"
    user_file = team.state / "users" / "carol.env"
    team.command("user", "carol")
    first = read_env_file(user_file)["MLFLOW_TRACKING_PASSWORD"]
    again = team.command("user", "carol", "--permission", "edit")
    assert again.stdout.startswith("user carol: EDIT on experiment 'fashion-mnist' and model ")
    assert again.stderr == ""  # nothing from importing MLflow's server package
    second = read_env_file(user_file)["MLFLOW_TRACKING_PASSWORD"]
    assert second != first
    assert http_status(probe, "carol", first) == 401
    assert http_status(probe, "carol", second) == 200
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", second)
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("fashion-mnist").experiment_id
    run = client.create_run(experiment)  # EDIT may write runs; READ may not
    client.set_terminated(run.info.run_id)


def test_adding_a_member_to_a_stack_that_is_down_fails_at_once(tmp_path: Path) -> None:
    from tests.team_stack import free_port_block

    state = tmp_path / "state"
    base = free_port_block(12)
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from pipeline.team.settings import load_stack; "
                    "load_stack(Path(sys.argv[1]), base_port=int(sys.argv[2]))",
                    str(state), str(base)], cwd=REPO_ROOT, check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.commands.team", "user", "dave", "--state", str(state)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"team: error: user: cannot reach http://127.0.0.1:{base + 1} (")
    assert result.stderr.rstrip().endswith("`make team-up` first")
    assert len(result.stderr.splitlines()) == 1
    assert not (state / "users").exists()


@pytest.mark.parametrize("command", [["pipeline.commands.preflight"],
                                     ["pipeline.commands.team", "check"]])
def test_the_preflight_answers_under_both_names(command: list[str]) -> None:
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith("MLFLOW_TRACKING")},
           "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", *command], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "team: error: cannot reach the MLflow tracking server http://127.0.0.1:9 (")
    env["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"
    result = subprocess.run([sys.executable, "-m", *command], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (
        0, "team: the tracking store sqlite:///mlflow.db answers\n")


def test_the_state_is_private_after_up(team: Team) -> None:
    """Password hashes (basic_auth.db), logs, keys and objects: nobody else reads them."""
    state_mode = stat.S_IMODE(team.state.stat().st_mode)
    # As root, PostgreSQL runs as `postgres` and must pass through (711: enter, not list).
    assert state_mode == (0o711 if os.geteuid() == 0 else 0o700)
    (team.state / "logs" / "mlflow.log").chmod(0o644)  # loosened: the next up tightens it
    team.command("up")
    data = team.state / "postgres" / "data"
    seen = 0
    for folder, dirs, files in os.walk(team.state):
        here = Path(folder)
        if here == data:
            dirs[:] = []
            continue
        for name in dirs:
            assert stat.S_IMODE((here / name).stat().st_mode) == 0o700, here / name
        for name in files:
            assert stat.S_IMODE((here / name).stat().st_mode) == 0o600, here / name
            seen += 1
    assert seen >= 8
    for private in ("mlflow/basic_auth.db", "logs/mlflow.log", "logs/seaweedfs.log",
                    "postgres/postgres.log", "seaweedfs-config/node.key"):
        assert stat.S_IMODE((team.state / private).stat().st_mode) == 0o600, private


def test_a_new_state_folder_is_private_from_its_creation(tmp_path: Path) -> None:
    from pipeline.team.settings import load_stack

    load_stack(tmp_path / "fresh")
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == (
        0o711 if os.geteuid() == 0 else 0o700)
    assert stat.S_IMODE((tmp_path / "fresh" / "stack.json").stat().st_mode) == 0o600
