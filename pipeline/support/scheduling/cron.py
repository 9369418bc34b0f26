"""The retraining cycle as one tagged line of the user's crontab.

The line ends with the tag `# fashion-mnist-retrain:<repo>`: installing again replaces it, so
there is never more than one per checkout. The crontab is read and written with `crontab -l` and
`crontab -`; the environment variable CRONTAB names another command (tests use a fake one).
`crontab -` checks every line it is given and installs nothing if one is wrong, so a bad cron
expression is refused with crontab's own reason.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pipeline.support.scheduling import PRESETS, VENV_PYTHON, ScheduleError
from pipeline.support.workspace import RETRAIN_LOG

CRONTAB_ENV = "CRONTAB"
TAG_PREFIX = "# fashion-mnist-retrain:"


def cron_schedule(every: str) -> str:
    """A preset name as its cron expression; anything else is left for `crontab` to judge."""
    if every in PRESETS:
        return PRESETS[every][0]
    expression = " ".join(every.split())
    if not expression or "\n" in every or "#" in every:
        raise ScheduleError(f"--every {every!r}: expected {', '.join(PRESETS)} or one cron "
                            f"expression such as {PRESETS['weekly'][0]!r}")
    return expression


def _run_crontab(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [*shlex.split(os.environ.get(CRONTAB_ENV) or "crontab"), *args]
    try:
        return subprocess.run(command, input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise ScheduleError(
            f"`{command[0]}` not found, so there is no crontab to install into. Install cron "
            "(Debian/Ubuntu: apt-get install cron) or use the systemd timer instead: "
            "python -m pipeline.commands.schedule install-systemd"
        ) from None


def read_crontab() -> str:
    """The current user's crontab; empty when there is none yet."""
    result = _run_crontab(["-l"])
    if result.returncode == 0:
        return result.stdout
    if "no crontab" in result.stderr.lower():  # cron, cronie, busybox: "no crontab for <user>"
        return ""
    raise ScheduleError(f"`crontab -l` failed (exit code {result.returncode}): "
                        f"{result.stderr.strip()}")


def write_crontab(text: str, schedule: str | None = None) -> None:
    """Install `text` as the crontab; crontab installs nothing if it refuses a line."""
    result = _run_crontab(["-"], stdin=text)
    if result.returncode != 0:
        what = f"the schedule {schedule!r}" if schedule else "the new crontab"
        raise ScheduleError(
            f"`crontab -` refused {what} (exit code {result.returncode}): "
            f"{' '.join(result.stderr.split()).rstrip('.')}. Nothing was changed; use "
            f"{', '.join(PRESETS)} or a 5-field cron expression such as "
            f"{PRESETS['weekly'][0]!r} (minute hour day-of-month month day-of-week)")


def _cron_escape(text: str) -> str:
    return text.replace("%", r"\%")  # cron turns an unescaped % into a newline


def tag_for(repo: Path) -> str:
    return _cron_escape(f"{TAG_PREFIX}{repo}")


def cron_line(repo: Path, schedule: str, make: str) -> str:
    """The crontab line that runs one cycle in `repo`, tagged with the repository path.

    cron hands the command to /bin/sh: the paths are quoted for it with shlex, then every `%`
    escaped for cron itself.
    """
    if "\n" in str(repo):
        raise ScheduleError(f"{repo!r}: a path with a newline cannot go in a crontab")
    log = f">> {RETRAIN_LOG} 2>&1"
    command = (
        f"cd {shlex.quote(str(repo))} && mkdir -p logs && {shlex.quote(make)} -s setup {log} "
        f"&& {VENV_PYTHON} -m pipeline.retrain --no-wait {log}"
    )
    return f"{schedule} {_cron_escape(command)} {tag_for(repo)}"


def _is_tagged(line: str, tag: str) -> bool:
    return not line.lstrip().startswith("#") and line.rstrip().endswith(tag)


def with_entry(crontab: str, line: str, tag: str) -> str:
    """`crontab` with `line` in place of the tagged line(s), or added at the end."""
    kept, placed = [], False
    for existing in crontab.splitlines():
        if _is_tagged(existing, tag):
            if not placed:
                kept.append(line)
                placed = True
            continue
        kept.append(existing)
    if not placed:
        kept.append(line)
    return "\n".join(kept) + "\n"  # cron ignores a last line without a newline


def without_entry(crontab: str, tag: str) -> tuple[str, int]:
    """`crontab` without the tagged lines, and how many there were."""
    lines = crontab.splitlines()
    kept = [line for line in lines if not _is_tagged(line, tag)]
    removed = len(lines) - len(kept)
    return ("\n".join(kept) + "\n" if kept else ""), removed


def entries(crontab: str, tag: str) -> list[str]:
    return [line for line in crontab.splitlines() if _is_tagged(line, tag)]
