"""One exclusive lock between processes on this machine: an flock on a file that says who holds it.

The kernel drops an flock when its process dies, so a crash never leaves a stale lock. The file is
never deleted: removing a lock file while others wait on it would let two processes each hold
"the" lock. Used by the retraining cycle and, for a local store, by the register stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path


class LockBusy(Exception):
    """Another process holds the lock; the message says who, as far as the lock file knows."""


def timestamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block.

    Busy: with `wait`, call `on_wait(holder)` once ("pid N since <time>", from the lock file) and
    block until it is free; without, raise LockBusy.
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
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {timestamp()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
