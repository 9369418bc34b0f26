"""Least privilege: each member holds only what its permission needs, and loses it when removed.

A READ member's env file, taken as is, is refused on every write beyond MLflow too: S3 (both
buckets), the register lock and the Optuna study. An EDIT member pushes to the `dvc` bucket
with an identity of its own, takes the lock and writes the study through a role of its own,
and never touches the `mlflow` bucket (MLflow proxies artifacts). Removal revokes it all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.team.settings import DVC_BUCKET, MLFLOW_BUCKET, S3_CLIENT_ENV
from tests.team_stack import Team, http_status, read_env_file

pytestmark = pytest.mark.slow


def _s3(env: dict[str, str]):
    import boto3
    from botocore.config import Config

    os.environ.update(S3_CLIENT_ENV)
    return boto3.client("s3", endpoint_url=env["DVC_REMOTE_ENDPOINT_URL"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        config=Config(retries={"max_attempts": 1}))


def _refused(call) -> str:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as refused:
        call()
    return refused.value.response["Error"]["Code"]


def _member(team: Team, name: str, permission: str) -> dict[str, str]:
    made = team.command("user", name, "--permission", permission)
    assert f"user {name}: {permission}" in made.stdout
    return read_env_file(team.state / "users" / f"{name}.env")


def test_a_read_member_creates_nothing_on_the_mlflow_server(team: Team) -> None:
    """MLflow's basic auth would let any logged-in user create; the stack's authorization
    function refuses it to READ members (and lets the admin and EDIT members through)."""
    reader = _member(team, "rita", "READ")
    editor = _member(team, "ed", "EDIT")
    uri = team.env["MLFLOW_TRACKING_URI"]
    creations = [
        ("/api/2.0/mlflow/experiments/create", {"name": "{who}-experiment"}),
        ("/api/2.0/mlflow/registered-models/create", {"name": "{who}-model"}),
        ("/api/3.0/mlflow/gateway/secrets/create",
         {"secret_name": "{who}-secret", "secret_value": {"api_key": "x"}, "provider": "openai"}),
    ]
    for path, body in creations:
        filled = {k: v.format(who="rita") if isinstance(v, str) else v for k, v in body.items()}
        assert http_status(uri + path, "rita", reader["MLFLOW_TRACKING_PASSWORD"],
                           body=filled) == 403, path
    # A search is a POST too, and stays allowed.
    assert http_status(uri + "/api/2.0/mlflow/runs/search", "rita",
                       reader["MLFLOW_TRACKING_PASSWORD"],
                       body={"experiment_ids": ["0"], "max_results": 1}) == 200
    assert http_status(uri + creations[0][0], "ed", editor["MLFLOW_TRACKING_PASSWORD"],
                       body={"name": "ed-experiment"}) == 200
    env = team.env
    assert http_status(uri + "/api/2.0/mlflow/experiments/search", env["MLFLOW_TRACKING_USERNAME"],
                       env["MLFLOW_TRACKING_PASSWORD"],
                       body={"filter": "name = 'rita-experiment'", "max_results": 1}) == 200
    from mlflow.tracking import MlflowClient

    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_USERNAME",
                                           "MLFLOW_TRACKING_PASSWORD")})
    admin = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert admin.get_experiment_by_name("rita-experiment") is None
    assert admin.get_experiment_by_name("ed-experiment") is not None
    assert not admin.search_registered_models("name = 'rita-model'")


def test_a_read_member_is_refused_every_write_beyond_mlflow(team: Team) -> None:
    import psycopg

    admin = _s3(team.env)
    admin.put_object(Bucket=DVC_BUCKET, Key="members/kept.bin", Body=b"kept")
    admin.put_object(Bucket=MLFLOW_BUCKET, Key="members/kept.bin", Body=b"kept")
    env = _member(team, "ruth", "READ")
    stack_secrets = set(team.stack.secrets.values())
    assert not stack_secrets & set(env.values()), "a stack secret in a member's env file"
    assert env["AWS_ACCESS_KEY_ID"] != team.env["AWS_ACCESS_KEY_ID"]
    assert "FMNIST_REGISTRY_LOCK_URL" not in env and "OPTUNA_STORAGE" not in env

    reader = _s3(env)
    # make pull needs this much, and gets it.
    assert reader.get_object(Bucket=DVC_BUCKET, Key="members/kept.bin")["Body"].read() == b"kept"
    assert "members/kept.bin" in [o["Key"] for o in reader.list_objects_v2(
        Bucket=DVC_BUCKET, Prefix="members/")["Contents"]]
    # Every write is refused, and nothing of the other bucket is readable.
    for bucket in (DVC_BUCKET, MLFLOW_BUCKET):
        assert _refused(lambda b=bucket: reader.put_object(Bucket=b, Key="members/kept.bin",
                                                           Body=b"replaced")) == "AccessDenied"
        assert _refused(lambda b=bucket: reader.delete_object(Bucket=b, Key="members/kept.bin")
                        ) == "AccessDenied"
    assert _refused(lambda: reader.get_object(Bucket=MLFLOW_BUCKET, Key="members/kept.bin")
                    ) == "AccessDenied"
    for bucket in (DVC_BUCKET, MLFLOW_BUCKET):
        assert admin.get_object(Bucket=bucket, Key="members/kept.bin")["Body"].read() == b"kept"

    # The lock and the study: no URL, and no value of the file opens either database.
    port = team.stack.ports["postgres"]
    for database in ("registry_lock", "optuna"):
        for user in ("fmnist_member_ruth", "fmnist_lock", "fmnist_optuna", "ruth"):
            for password in set(env.values()):
                with pytest.raises(psycopg.OperationalError):
                    psycopg.connect(host="127.0.0.1", port=port, dbname=database, user=user,
                                    password=password, connect_timeout=5).close()


def test_an_edit_member_writes_through_its_own_identity_and_removal_revokes_it(
        team: Team, tmp_path: Path) -> None:
    import optuna
    import psycopg

    from pipeline.support.locks import advisory_lock

    env = _member(team, "eddie", "EDIT")
    writer = _s3(env)
    writer.put_object(Bucket=DVC_BUCKET, Key="members/eddie.bin", Body=b"pushed")
    writer.delete_object(Bucket=DVC_BUCKET, Key="members/eddie.bin")
    assert _refused(lambda: writer.put_object(Bucket=MLFLOW_BUCKET, Key="members/eddie.bin",
                                              Body=b"x")) == "AccessDenied"
    assert "fmnist_member_eddie" in env["FMNIST_REGISTRY_LOCK_URL"]
    with advisory_lock(env["FMNIST_REGISTRY_LOCK_URL"], "members test"):
        pass
    storage = optuna.storages.RDBStorage(env["OPTUNA_STORAGE"])
    study = optuna.create_study(storage=storage, study_name="members-test")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    optuna.delete_study(study_name="members-test", storage=storage)
    storage.engine.dispose()
    with pytest.raises(psycopg.OperationalError):  # its role reaches the lock and study only
        url = env["FMNIST_REGISTRY_LOCK_URL"].rsplit("/", 1)[0] + "/mlflow"
        psycopg.connect(url, connect_timeout=5).close()

    removed = team.command("remove-user", "eddie")
    assert "user eddie: removed" in removed.stdout
    assert not (team.state / "users" / "eddie.env").exists()
    assert _refused(lambda: writer.put_object(Bucket=DVC_BUCKET, Key="members/eddie.bin",
                                              Body=b"x")) in ("InvalidAccessKeyId", "AccessDenied")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(env["FMNIST_REGISTRY_LOCK_URL"], connect_timeout=5).close()
    import urllib.error
    import urllib.request
    from base64 import b64encode

    request = urllib.request.Request(
        env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Authorization": "Basic " + b64encode(
            f"eddie:{env['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
