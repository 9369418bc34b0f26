"""Run the retraining cycle on a schedule: a cron entry, or a systemd user timer.

Usage:
  python -m pipeline.commands.schedule install [--every weekly|daily|hourly|"<cron expression>"]
  python -m pipeline.commands.schedule uninstall
  python -m pipeline.commands.schedule show
  python -m pipeline.commands.schedule install-systemd [--every weekly|daily|hourly
                                                        | --on-calendar SPEC]
  python -m pipeline.commands.schedule uninstall-systemd
All take [--repo DIR] (default: the directory holding dvc.yaml, at or above the current one).

cron (`pipeline.support.scheduling.cron`): one line in the current user's crontab runs
  cd <repo> && mkdir -p logs && make -s setup >> logs/retrain.log 2>&1
    && .venv/bin/python -m pipeline.retrain --no-wait >> logs/retrain.log 2>&1
at minute 17 (off the hour, when many machines run their jobs): weekly is Monday 03:17.
`make setup` brings the virtualenv up to date; the cycle itself runs without make, which would
turn its exit code 75 ("another cycle is running", with --no-wait: exit instead of queueing
behind it) into 2. Installing again replaces the line, so there is never more than one per
checkout. The environment variable CRONTAB names another crontab command (tests use a fake one).

systemd (`pipeline.support.scheduling.systemd`): deploy/systemd/fashion-mnist-retrain.{service,
timer} rendered into ~/.config/systemd/user/ (or $XDG_CONFIG_HOME/systemd/user) with the paths
filled in (the same two commands as cron, 75 counting as success); the systemctl commands that
enable the timer are printed, not run.

Exit codes: 0 done, 1 error (the message says why and what to do; --debug or FMNIST_DEBUG=1
shows its traceback too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.support import errors
from pipeline.support.scheduling import (
    DEFAULT_EVERY,
    PRESETS,
    ScheduleError,
    make_binary,
    systemd,
)
from pipeline.support.scheduling.cron import (
    CRONTAB_ENV,
    cron_line,
    cron_schedule,
    entries,
    read_crontab,
    tag_for,
    with_entry,
    without_entry,
    write_crontab,
)
from pipeline.support.workspace import RETRAIN_LOG, CommandError, find_repo_root

UNIT_NAME = systemd.UNIT_NAME


def install(repo: Path, every: str) -> None:
    schedule = cron_schedule(every)
    line = cron_line(repo, schedule, make_binary())
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


def install_systemd(repo: Path, calendar: str | None, dest: Path) -> None:
    when = systemd.install_units(repo, calendar, dest)
    print(f"schedule: wrote {dest / (UNIT_NAME + '.service')} and .timer "
          f"(OnCalendar={when}); enable the timer with:")
    print(f"  systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}.timer")
    print("  loginctl enable-linger \"$USER\"   # so that it also runs while you are logged out")
    print(f"schedule: run output goes to `journalctl --user -u {UNIT_NAME}`; "
          f"the cycle summary to {repo / RETRAIN_LOG}")


def uninstall_systemd(dest: Path) -> None:
    removed = systemd.remove_units(dest)
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
    _, timer = systemd.unit_files(dest)
    if timer.exists():
        state = "enabled" if systemd.timer_enabled(dest) else "installed, not enabled"
        when = systemd.installed_calendar(timer.read_text()) or "?"
        print(f"systemd: {state} ({timer}, OnCalendar={when})")
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
    common.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
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
        dest = getattr(args, "dest", None) or systemd.user_dir()
        if args.command == "install":
            install(repo, args.every)
        elif args.command == "uninstall":
            uninstall(repo)
        elif args.command == "show":
            show(repo, dest)
        elif args.command == "install-systemd":
            install_systemd(repo, systemd.on_calendar(args.every, args.on_calendar), dest)
        else:
            uninstall_systemd(dest)
    except (ScheduleError, CommandError, OSError) as exc:
        errors.report("schedule", exc, args.debug, message=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
