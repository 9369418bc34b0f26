"""Team members: an account each, with READ, EDIT or MANAGE on the project's experiment and model.

Through MLflow's own clients, as the stack's admin: the basic-auth app's client for users and
permissions, MlflowClient for the experiment and registered model the permissions point at.
Beyond MLflow, each member gets only what its permission needs, under its own name so that
removing the member revokes it: an S3 identity on the `dvc` bucket (READ: read and list; EDIT,
MANAGE: write too) and, for EDIT and MANAGE, a PostgreSQL role that reaches the register lock
and the Optuna study. A member never holds the stack's admin keys (MLflow proxies artifacts).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.support import config, store
from pipeline.support.workspace import CommandError
from pipeline.team import mlflow_server, postgres, seaweedfs, supervisor
from pipeline.team.settings import (
    ADMIN,
    MEMBER_NAME,
    Stack,
    env_file_text,
    members,
    save_members,
    write_private,
)

PERMISSIONS = ("READ", "EDIT", "MANAGE")
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
# Credentials of the caller's environment that MLflow's client would send instead of the admin's.
_OTHER_CREDENTIALS = (store.TOKEN_ENV, store.AUTH_PLUGIN_ENV)


@contextlib.contextmanager
def _as_admin(stack: Stack) -> Iterator[None]:
    """MLflow's clients read their credentials from the environment: the admin's, for a while."""
    saved = {key: os.environ.get(key) for key in (store.USERNAME_ENV, store.PASSWORD_ENV,
                                                  *_OTHER_CREDENTIALS)}
    os.environ.update({store.USERNAME_ENV: ADMIN,
                       store.PASSWORD_ENV: stack.secrets["admin_password"]})
    for key in _OTHER_CREDENTIALS:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def add_user(stack: Stack, name: str, permission: str, mlflow_cfg: config.MlflowConfig,
             say: Callable[[str], None] = print) -> Path:
    """Create (or re-key) a user with `permission` on the project's experiment and model.

    Writes `<state>/users/<name>.env` (mode 600) with the user's credentials and returns it.
    """
    if permission not in PERMISSIONS:
        raise CommandError("user", f"permission {permission!r}: expected one of "
                                   f"{', '.join(PERMISSIONS)}")
    _check_name(name)
    url = _reachable(stack)
    password = secrets.token_urlsafe(18)
    store.quiet_mlflow()  # bounded retries and timeouts, before mlflow is imported
    from mlflow.exceptions import MlflowException

    try:
        with _as_admin(stack):
            _grant(url, name, password, permission, mlflow_cfg)
    except MlflowException as exc:
        raise CommandError("user", exc.message) from None
    found = members(stack)
    found[name] = {"permission": permission, "s3_access_key": "member" + secrets.token_hex(8),
                   "s3_secret_key": secrets.token_urlsafe(24),
                   "pg_password": secrets.token_urlsafe(24)}
    postgres.grant_member(stack, name, permission, found[name]["pg_password"])
    save_members(stack, found)
    seaweedfs.restart(stack)  # weed reads its S3 identities at start
    path = stack.path("users", f"{name}.env")
    write_private(path, env_file_text({**stack.member_env(name), store.USERNAME_ENV: name,
                                       store.PASSWORD_ENV: password}))
    say(f"user {name}: {permission} on experiment {mlflow_cfg.experiment!r} and model "
        f"{mlflow_cfg.registered_model!r}; settings in {path}")
    return path


def remove_user(stack: Stack, name: str, say: Callable[[str], None] = print) -> None:
    """Revoke everything `add_user` gave: the MLflow account, the S3 identity, the role."""
    _check_name(name)
    url = _reachable(stack)
    store.quiet_mlflow()
    from mlflow.exceptions import MlflowException

    try:
        with _as_admin(stack):
            auth = _auth_client(url)
            try:
                auth.delete_user(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
    except MlflowException as exc:
        raise CommandError("user", exc.message) from None
    found = members(stack)
    found.pop(name, None)
    save_members(stack, found)
    seaweedfs.restart(stack)
    postgres.drop_member(stack, name)
    stack.path("users", f"{name}.env").unlink(missing_ok=True)
    say(f"user {name}: removed (MLflow account, S3 keys and database role revoked)")


def _check_name(name: str) -> None:
    if not MEMBER_NAME.fullmatch(name) or name == ADMIN:
        raise CommandError("user", f"name {name!r}: expected letters, digits, '_', '.' or '-' "
                                   f"(at most 40, not {ADMIN!r})")


def _reachable(stack: Stack) -> str:
    """MLflow's client would retry a server that is down for a while: one quick probe first."""
    url = stack.url("mlflow")
    reason = supervisor.unreachable(mlflow_server.health_url(stack), timeout=5.0)
    if reason is not None:
        raise CommandError("user", f"cannot reach {url} ({reason}): `make team-up` first")
    return url


def _auth_client(url: str):
    with warnings.catch_warnings():  # the client's module imports the server's apps, unused
        warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")
        from mlflow.server import get_app_client

        return get_app_client("basic-auth", tracking_uri=url)


def _grant(url: str, name: str, password: str, permission: str,
           mlflow_cfg: config.MlflowConfig) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    auth = _auth_client(url)
    try:
        auth.create_user(name, password)
    except MlflowException as exc:
        if exc.error_code != ALREADY_EXISTS:
            raise
        auth.update_user_password(name, password)
    # The project's experiment and registered model, so that the permission has a target.
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    model = mlflow_cfg.registered_model
    try:
        client.create_registered_model(model)
    except MlflowException as exc:
        if exc.error_code != ALREADY_EXISTS:
            raise
    experiment = client.get_experiment_by_name(mlflow_cfg.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(mlflow_cfg.experiment))
    for kind, resource in (("registered_model", model), ("experiment", experiment_id)):
        try:
            auth.grant_user_permission(name, kind, resource, permission)
        except MlflowException as exc:
            if exc.error_code != ALREADY_EXISTS:
                raise
            auth.revoke_user_permission(name, kind, resource)
            auth.grant_user_permission(name, kind, resource, permission)
