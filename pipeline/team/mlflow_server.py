"""`mlflow server --app-name basic-auth`: runs and registry on PostgreSQL, artifacts proxied to S3.

Clients need no S3 credentials for MLflow; its users and permissions live in a sqlite database
of the state folder, with the stack's admin (see `users`).
"""

from __future__ import annotations

from pipeline.support.workspace import child_env, venv_tool
from pipeline.team import mlflow_auth, supervisor
from pipeline.team.settings import (
    ADMIN,
    MEMBERS_FILE,
    MLFLOW_BUCKET,
    S3_CLIENT_ENV,
    Stack,
    write_private,
)

NAME = "mlflow"
START_SECONDS = 120


def health_url(stack: Stack) -> str:
    return stack.url("mlflow") + "/health"


def start(stack: Stack) -> None:
    auth = stack.path("mlflow", "basic_auth.ini")
    write_private(auth, "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = sqlite:///{stack.path('mlflow', 'basic_auth.db')}",
        f"admin_username = {ADMIN}",
        f"admin_password = {stack.secrets['admin_password']}",
        # MLflow's basic auth, plus: READ members create and change nothing (see mlflow_auth).
        "authorization_function = pipeline.team.mlflow_auth:authenticate",
        # Checking a password (PBKDF2) costs more CPU than most requests: remember a good one
        # for a minute. A changed password or permission takes effect at once on this worker.
        "auth_cache_ttl_seconds = 60",
    ]) + "\n")
    env = {
        **{k: v for k, v in child_env().items() if not k.startswith("MLFLOW_TRACKING_")},
        **S3_CLIENT_ENV,
        "MLFLOW_BACKEND_STORE_URI": stack.database_url("mlflow", "mlflow",
                                                       "postgresql+psycopg"),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{MLFLOW_BUCKET}/artifacts",
        "MLFLOW_S3_ENDPOINT_URL": stack.url("s3"),
        "AWS_ACCESS_KEY_ID": stack.secrets["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": stack.secrets["s3_secret_key"],
        "MLFLOW_AUTH_CONFIG_PATH": str(auth),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.secrets["flask_secret"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        mlflow_auth.MEMBERS_ENV: str(stack.path(MEMBERS_FILE)),
        mlflow_auth.ADMIN_ENV: ADMIN,
    }
    argv = [venv_tool("mlflow"), "server", "--app-name", "basic-auth", "--host", stack.host,
            "--port", str(stack.ports["mlflow"]), "--workers", "1"]
    supervisor.spawn(stack.state, NAME, argv, env)


def ready(stack: Stack) -> bool:
    return supervisor.answers(health_url(stack))


def running(stack: Stack) -> bool:
    return supervisor.pid(stack.state, NAME) is not None and ready(stack)
