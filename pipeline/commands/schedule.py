"""Run the retraining cycle on a schedule: a cron entry, or a systemd user timer.

Usage:
  python -m pipeline.commands.schedule install [--every weekly|daily|hourly|"<cron expression>"]
  python -m pipeline.commands.schedule uninstall
  python -m pipeline.commands.schedule show
  python -m pipeline.commands.schedule install-systemd [--every weekly|daily|hourly
                                                        | --on-calendar SPEC]
  python -m pipeline.commands.schedule uninstall-systemd
All take [--repo DIR] (default: the directory holding dvc.yaml, at or above the current one).

cron: one line in the current user's crontab runs
  cd <repo> && mkdir -p logs && make -s setup >> logs/retrain.log 2>&1
    && .venv/bin/python -m pipeline.retrain --no-wait >> logs/retrain.log 2>&1
at minute 17 (off the hour, when many machines run their jobs): weekly is Monday 03:17.
`make setup` brings the virtualenv up to date; the cycle itself runs without make, which would
turn its exit code 75 ("another cycle is running", with --no-wait: exit instead of queueing
behind it) into 2. The line ends with the tag `# fashion-mnist-retrain:<repo>`: installing again
replaces it, so there is never more than one per checkout. The crontab is read and written with
`crontab -l` and `crontab -`; the environment variable CRONTAB names another command (tests use
a fake one).

systemd: deploy/systemd/fashion-mnist-retrain.{service,timer} rendered into
~/.config/systemd/user/ (or $XDG_CONFIG_HOME/systemd/user) with the paths filled in (the same
two commands as cron, 75 counting as success); the systemctl commands that enable the timer are
printed, not run.

Exit codes: 0 done, 1 error (the message says why and what to do).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_write_text
from pipeline.support.workspace import RETRAIN_LOG, CommandError, find_repo_root

CRONTAB_ENV = "CRONTAB"
TAG_PREFIX = "# fashion-mnist-retrain:"
PRESETS = {  # cron expression, systemd OnCalendar
    "weekly": ("17 3 * * 1", "Mon *-*-* 03:17:00"),
    "daily": ("17 3 * * *", "*-*-* 03:17:00"),
    "hourly": ("17 * * * *", "*-*-* *:17:00"),
}
DEFAULT_EVERY = "weekly"
UNIT_NAME = "fashion-mnist-retrain"
VENV_PYTHON = Path(".venv") / "bin" / "python"  # the Makefile's virtualenv, from the repo root
# pipeline/commands/schedule.py -> the repository root
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


class ScheduleError(PipelineError):
    """Cannot (un)install the schedule; the message says what to do instead."""


# --- Cron expressions -----------------------------------------------------------------------


def cron_schedule(every: str) -> str:
    """A preset name as its cron expression; anything else is left for `crontab` to judge.

    `crontab -` checks every line it is given and installs nothing if one is wrong, so a bad
    expression is refused with crontab's own reason (see `write_crontab`).
    """
    if every in PRESETS:
        return PRESETS[every][0]
    expression = " ".join(every.split())
    if not expression or "\n" in every or "#" in every:
        raise ScheduleError(f"--every {every!r}: expected {', '.join(PRESETS)} or one cron "
                            f"expression such as {PRESETS['weekly'][0]!r}")
    return expression


# --- The crontab ----------------------------------------------------------------------------


def _crontab_command() -> list[str]:
    return shlex.split(os.environ.get(CRONTAB_ENV) or "crontab")


def _run_crontab(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [*_crontab_command(), *args]
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
    """The crontab line that runs one cycle in `repo`, tagged with the repository path."""
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


def _make_binary() -> str:
    make = shutil.which("make")
    if make is None:
        raise ScheduleError("`make` not found on PATH; install it (apt-get install make)")
    return make


def install(repo: Path, every: str) -> None:
    schedule = cron_schedule(every)
    line = cron_line(repo, schedule, _make_binary())
    current = read_crontab()
    replaced = bool(entries(current, tag_for(repo)))
    write_crontab(with_entry(current, line, tag_for(repo)), schedule)
    (repo / RETRAIN_LOG).parent.mkdir(parents=True, exist_ok=True)
    print(f"schedule: {'replaced' if replaced else 'installed'} the cron entry ({schedule}):")
    print(f"  {line}")
    print(f"schedule: output of each run is appended to {repo / RETRAIN_LOG}")


def uninstall(repo: Path) -> None:
    updated, removed = without_entry(read_crontab(), tag_for(repo))
    if not removed:
        print(f"schedule: no cron entry for {repo}; nothing to remove")
        return
    write_crontab(updated)
    print(f"schedule: removed the cron entry for {repo}")


# --- systemd --------------------------------------------------------------------------------


def systemd_user_dir() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def on_calendar(every: str | None, spec: str | None) -> str | None:
    """The OnCalendar value for --every / --on-calendar; None keeps the timer's own."""
    if spec is not None:
        if not spec.strip() or "\n" in spec:
            raise ScheduleError(f"--on-calendar {spec!r}: expected one calendar expression")
        analyze = shutil.which("systemd-analyze")
        if analyze:
            result = subprocess.run([analyze, "calendar", spec], capture_output=True, text=True)
            if result.returncode != 0:
                raise ScheduleError(f"--on-calendar {spec!r}: {result.stderr.strip()}")
        return spec.strip()
    if every is None:
        return None
    if every not in PRESETS:
        raise ScheduleError(f"--every {every!r}: the systemd timer takes {', '.join(PRESETS)}; "
                            "give any other schedule with --on-calendar (see man systemd.time)")
    return PRESETS[every][1]


def _exec_word(path: str) -> str:
    """`path` as the command word of an Exec*= line (where `$` is literal): quoted if need be."""
    word = path.replace("%", "%%")
    if any(char.isspace() or char in "\"'\\;" for char in word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def render_service(template: str, repo: Path, make: str) -> str:
    """The service with the placeholders filled in; comments are left as written."""
    values = {"@REPO@": str(repo).replace("%", "%%"), "@MAKE@": _exec_word(make),
              "@PYTHON@": _exec_word(str(repo / VENV_PYTHON)),
              "@DOC_URL@": (repo / "pipeline" / "commands" / "retrain.py").as_uri()
              .replace("%", "%%")}
    pattern = re.compile("|".join(map(re.escape, values)))
    lines = []
    for line in template.splitlines():
        if not line.lstrip().startswith("#"):
            line = pattern.sub(lambda match: values[match.group(0)], line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def render_timer(template: str, calendar: str | None) -> str:
    """The timer, with another schedule if one is given: OnCalendar, and the Description and a
    first comment that say so (the template's comments describe its weekly default)."""
    if calendar is None:
        return template
    timer = re.sub(r"(?m)^OnCalendar=.*$", lambda _: f"OnCalendar={calendar}", template)
    timer = re.sub(r"(?m)^Description=.*$",
                   lambda _: f"Description=Fashion-MNIST retraining, OnCalendar={calendar}", timer)
    return (f"# Installed with OnCalendar={calendar}; the comments below describe the "
            "template's default.\n" + timer)


def _rendered_header(repo: Path) -> str:
    return (f"# Rendered for {repo} by `python -m pipeline.commands.schedule install-systemd`\n"
            f"# from {TEMPLATE_DIR.relative_to(TEMPLATE_DIR.parents[1])}: edit that and install "
            "again rather than this file.\n")


def install_systemd(repo: Path, calendar: str | None, dest: Path) -> None:
    if "\n" in str(repo):
        raise ScheduleError(f"{repo!r}: a path with a newline cannot go in a unit file")
    service = render_service((TEMPLATE_DIR / f"{UNIT_NAME}.service").read_text(), repo,
                             _make_binary())
    timer = render_timer((TEMPLATE_DIR / f"{UNIT_NAME}.timer").read_text(), calendar)
    dest.mkdir(parents=True, exist_ok=True)
    header = _rendered_header(repo)
    atomic_write_text(dest / f"{UNIT_NAME}.service", header + service)
    atomic_write_text(dest / f"{UNIT_NAME}.timer", header + timer)
    when = re.search(r"(?m)^OnCalendar=(.*)$", timer)
    print(f"schedule: wrote {dest / (UNIT_NAME + '.service')} and .timer "
          f"(OnCalendar={when.group(1) if when else '?'}); enable the timer with:")
    print(f"  systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}.timer")
    print("  loginctl enable-linger \"$USER\"   # so that it also runs while you are logged out")
    print(f"schedule: run output goes to `journalctl --user -u {UNIT_NAME}`; "
          f"the cycle summary to {repo / RETRAIN_LOG}")


def _timer_enabled(dest: Path) -> bool:
    return (dest / "timers.target.wants" / f"{UNIT_NAME}.timer").exists()


def uninstall_systemd(dest: Path) -> None:
    files = [dest / f"{UNIT_NAME}.service", dest / f"{UNIT_NAME}.timer"]
    if _timer_enabled(dest):
        raise ScheduleError(f"the timer is enabled; first run: systemctl --user disable --now "
                            f"{UNIT_NAME}.timer")
    removed = [path for path in files if path.exists()]
    for path in removed:
        path.unlink()
    if not removed:
        print(f"schedule: no {UNIT_NAME} units in {dest}; nothing to remove")
        return
    print(f"schedule: removed {', '.join(path.name for path in removed)} from {dest}; then run:")
    print("  systemctl --user daemon-reload")


def show(repo: Path, dest: Path) -> None:
    try:
        found = entries(read_crontab(), tag_for(repo))
        if found:
            print(f"cron: scheduled ({' '.join(found[0].split()[:5])}):")
            for line in found:
                print(f"  {line}")
        else:
            print(f"cron: not scheduled for {repo}")
    except ScheduleError as exc:
        print(f"cron: unknown ({exc})")
    timer = dest / f"{UNIT_NAME}.timer"
    if timer.exists():
        state = "enabled" if _timer_enabled(dest) else "installed, not enabled"
        when = re.search(r"(?m)^OnCalendar=(.*)$", timer.read_text())
        print(f"systemd: {state} ({timer}, OnCalendar={when.group(1) if when else '?'})")
    else:
        print(f"systemd: no timer in {dest}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.commands.schedule",
        description="Schedule the retraining cycle (pipeline.retrain) with cron or a systemd "
                    "timer.",
        epilog=f"{CRONTAB_ENV}: the crontab command to use (default: crontab). "
               "Exit codes: 0 done, 1 error.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo", type=Path, default=None,
                        help="repository root (default: where dvc.yaml is, from the current dir)")
    units = argparse.ArgumentParser(add_help=False)
    units.add_argument("--dest", type=Path, default=None,
                       help="unit directory (default: ~/.config/systemd/user)")
    commands = parser.add_subparsers(dest="command", required=True)
    install_parser = commands.add_parser("install", parents=[common],
                                         help="add or replace the cron entry")
    install_parser.add_argument(
        "--every", default=DEFAULT_EVERY,
        help=f"{', '.join(PRESETS)} or a 5-field cron expression (default: {DEFAULT_EVERY}, "
             f"{PRESETS[DEFAULT_EVERY][0]!r})",
    )
    commands.add_parser("uninstall", parents=[common], help="remove the cron entry")
    commands.add_parser("show", parents=[common, units],
                        help="show the cron entry and the systemd timer, if any")
    systemd_parser = commands.add_parser("install-systemd", parents=[common, units],
                                         help="write the systemd user service and timer")
    when = systemd_parser.add_mutually_exclusive_group()
    when.add_argument("--every", choices=list(PRESETS), default=None,
                      help="preset (default: the timer's own, weekly Monday 03:17)")
    when.add_argument("--on-calendar", default=None, help="a systemd OnCalendar expression")
    commands.add_parser("uninstall-systemd", parents=[common, units],
                        help="remove the systemd user service and timer")
    args = parser.parse_args(argv)

    try:
        repo = find_repo_root(args.repo if args.repo is not None else Path.cwd()).resolve()
        dest = getattr(args, "dest", None) or systemd_user_dir()
        if args.command == "install":
            install(repo, args.every)
        elif args.command == "uninstall":
            uninstall(repo)
        elif args.command == "show":
            show(repo, dest)
        elif args.command == "install-systemd":
            install_systemd(repo, on_calendar(args.every, args.on_calendar), dest)
        else:
            uninstall_systemd(dest)
    except (ScheduleError, CommandError, OSError) as exc:
        print(f"schedule: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
