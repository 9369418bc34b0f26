"""PostgreSQL for the stack: the server binaries, its data folder, and one role per database.

MLflow's runs and registry, the register stage's cross-machine lock and the Optuna studies of
`make tune` each get a database and a role that can reach that database only. As root,
PostgreSQL refuses to run: its commands run as the `postgres` user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pipeline.support.workspace import CommandError
from pipeline.team.settings import (
    LOCK_DATABASE,
    OPTUNA_DATABASE,
    ROLE_DATABASES,
    WRITERS,
    Stack,
    member_role,
    write_private,
)

POSTGRES_ROOTS = (Path("/usr/lib/postgresql"),)
INSTALL_HINT = "install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`)"


def binaries() -> Path:
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


def as_postgres(argv: list[str]) -> list[str]:
    """As root, PostgreSQL refuses to run: its commands run as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(step: str, argv: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise CommandError(step, detail[-1] if detail else f"exit code {result.returncode}")
    return result


def dirs(stack: Stack) -> tuple[Path, Path]:
    """The data folder and the server's log."""
    return stack.path("postgres", "data"), stack.path("postgres", "postgres.log")


def is_initialised(stack: Stack) -> bool:
    return (dirs(stack)[0] / "PG_VERSION").is_file()


def is_running(stack: Stack, bin_dir: Path) -> bool:
    data, _ = dirs(stack)
    if not data.is_dir():
        return False
    result = subprocess.run(as_postgres([str(bin_dir / "pg_ctl"), "status", "-D", str(data)]),
                            capture_output=True, text=True)
    return result.returncode == 0


def init(stack: Stack, bin_dir: Path) -> None:
    """`initdb` with the superuser password of the stack's secrets (password auth over TCP)."""
    data, _ = dirs(stack)
    folder = data.parent
    folder.mkdir(parents=True, exist_ok=True)
    password_file = folder / "initdb.pw"
    write_private(password_file, stack.secrets["postgres_password"] + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(password_file, "postgres", "postgres")
        probe = subprocess.run(as_postgres(["test", "-w", str(folder)]))
        if probe.returncode != 0:
            password_file.unlink()
            raise CommandError("postgres", f"the `postgres` user cannot write {folder}: make its "
                                           "parent folders traversable (chmod o+x) or choose "
                                           "another --state folder")
    try:
        _run("postgres initdb", as_postgres([
            str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
            "--auth-local=peer", "--auth-host=scram-sha-256", f"--pwfile={password_file}",
            "--no-instructions"]))
    finally:
        password_file.unlink(missing_ok=True)


def start(stack: Stack, bin_dir: Path) -> None:
    data, log = dirs(stack)
    options = f"-c listen_addresses={stack.host} -p {stack.ports['postgres']} -k {data}"
    _run("postgres start", as_postgres([
        str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", "60",
        "-o", options]))


def stop(stack: Stack, bin_dir: Path) -> None:
    data, _ = dirs(stack)
    _run("postgres stop", as_postgres([str(bin_dir / "pg_ctl"), "stop", "-D", str(data),
                                       "-m", "fast", "-w"]))


def bootstrap(stack: Stack) -> None:
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


def grant_member(stack: Stack, name: str, permission: str, password: str) -> None:
    """A role of the member's own: a writer reaches the lock and the study, a reader nothing.

    The study's tables belong to the study role: a writer's role is a member of it. Sessions of
    a role that loses its rights are ended at once.
    """
    import psycopg
    from psycopg import sql

    role = sql.Identifier(member_role(name))
    with psycopg.connect(stack.database_url("postgres", "postgres"), autocommit=True,
                         connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                              (member_role(name),)).fetchone()
        conn.execute(sql.SQL(("ALTER" if exists else "CREATE") + " ROLE {} LOGIN NOSUPERUSER "
                             "NOCREATEDB NOCREATEROLE INHERIT PASSWORD {}").format(
            role, sql.Literal(password)))
        databases = sql.SQL(", ").join(sql.Identifier(d) for d in (LOCK_DATABASE, OPTUNA_DATABASE))
        if permission in WRITERS:
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(databases, role))
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier("fmnist_optuna"), role))
        else:
            conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(databases, role))
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier("fmnist_optuna"),
                                                             role))
            _end_sessions(conn, member_role(name))


def drop_member(stack: Stack, name: str) -> None:
    """The member's role, its sessions ended first (a held lock is released with them)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(stack.database_url("postgres", "postgres"), autocommit=True,
                         connect_timeout=10) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                        (member_role(name),)).fetchone():
            # No new session while the old ones end.
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(member_role(name))))
        else:
            return
        _end_sessions(conn, member_role(name))
    role = sql.Identifier(member_role(name))
    for database in (OPTUNA_DATABASE, LOCK_DATABASE, "postgres"):
        # What the role owns (a study table it made) goes to the study role; its grants go.
        with psycopg.connect(stack.database_url("postgres", database), autocommit=True,
                             connect_timeout=10) as conn:
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                role, sql.Identifier("fmnist_optuna")))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
            if database == "postgres":
                conn.execute(sql.SQL("DROP ROLE {}").format(role))


def _end_sessions(conn, role: str) -> None:
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                 (role,))
