"""One exclusive lock between processes on this machine: an flock on a file that says who holds it.

The kernel drops an flock when its process dies, so a crash never leaves a stale lock. The file is
never deleted: removing a lock file while others wait on it would let two processes each hold
"the" lock. Used by the retraining cycle and, for a local store, by the register stage.
Across machines (team mode) a file lock cannot help: `advisory_lock` holds a PostgreSQL advisory
lock instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.support.store import redact_url


class LockBusy(PipelineError):
    """Another process holds the lock; the message says who, as far as the lock file knows."""


def timestamp(when: float | None = None) -> str:
    """Local time to the second, with its UTC offset; now, or at `when` (seconds since epoch)."""
    moment = datetime.now() if when is None else datetime.fromtimestamp(when)
    return moment.astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, wait: bool = True, on_wait: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block.

    Busy: with `wait`, call `on_wait(holder)` once ("pid N since <time>", from the lock file) and
    block until it is free (at most `timeout` seconds, then LockBusy); without, raise LockBusy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            if not wait:
                raise LockBusy(f"{path} is held by {holder}") from None
            if on_wait is not None:
                on_wait(holder)
            if timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                _flock_within(fd, timeout, f"{path} is still held after {timeout:g} s by "
                                           f"{holder}; nothing was done")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {timestamp()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _flock_within(fd: int, timeout: float, busy: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockBusy(busy) from None
            time.sleep(0.1)


class LockUnavailable(PipelineError, ConnectionError):
    """The database that holds a shared lock cannot be reached; nothing was changed."""


@contextlib.contextmanager
def advisory_lock(
    url: str, name: str, on_wait: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """Hold PostgreSQL's session-level advisory lock `name` (hashed to a key) for the block.

    Shared by every machine that reaches the database at `url`. The lock belongs to the
    connection: if the process dies or its connection breaks, the server releases it, so a crash
    never leaves a stale lock. Busy: call `on_wait(holder)` once, then wait, at most `timeout`
    seconds (PostgreSQL's lock_timeout, so waiting costs no polling); past it, LockBusy names
    the holder (its application name says process, host and since when; the server adds its
    address and backend pid).
    """
    import psycopg

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big",
                         signed=True)
    # Who holds it, for whoever waits (PostgreSQL keeps 63 bytes of it): process and host first.
    me = f"fashion-mnist pid {os.getpid()} on {os.uname().nodename} since {timestamp()}"
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10,
                               application_name=me[:63], keepalives=1, keepalives_idle=10,
                               keepalives_interval=5, keepalives_count=3)
    except psycopg.Error as exc:
        raise LockUnavailable(f"cannot reach the lock database {redact_url(url)}: "
                              f"{str(exc).strip().splitlines()[0]}") from None
    with conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            if on_wait is not None:
                on_wait(_holder(conn, key))
            if timeout is not None:
                conn.execute(f"SET lock_timeout = {max(1, int(timeout * 1000))}")
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg.errors.LockNotAvailable:
                raise LockBusy(f"the lock {name!r} is still held after {timeout:g} s by "
                               f"{_holder(conn, key)}; nothing was done: wait until it "
                               "finishes, or end that process") from None
            conn.execute("SET lock_timeout = 0")
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _holder(conn, key: int) -> str:
    """Who holds advisory lock `key`, from pg_stat_activity: what a person can act on."""
    found = conn.execute(
        "SELECT a.application_name, a.client_addr::text, a.pid FROM pg_locks l "
        "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.granted AND "
        "((l.classid::bigint << 32) | l.objid::bigint) = %s", (key,)).fetchone()
    if found is None:
        return "another session"
    application, address, backend = found
    where = f"client {address}, " if address else ""
    return f"{application or 'another session'} ({where}server pid {backend})"
