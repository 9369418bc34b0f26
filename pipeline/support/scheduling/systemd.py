"""The retraining cycle as a systemd *user* service and timer, rendered from deploy/systemd/.

The service is a `string.Template`: `${REPO}`, `${MAKE}`, `${PYTHON}` and `${DOC_URL}` are
filled in with this checkout's paths, quoted by systemd's rules (not the shell's: systemd runs
no shell). The timer is a real unit, copied with another OnCalendar when one is asked for.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import subprocess
from pathlib import Path

from pipeline.core.files import atomic_write_text
from pipeline.support.scheduling import PRESETS, VENV_PYTHON, ScheduleError, make_binary

UNIT_NAME = "fashion-mnist-retrain"
# pipeline/support/scheduling/systemd.py -> the repository root
TEMPLATE_DIR = Path(__file__).resolve().parents[3] / "deploy" / "systemd"
_ON_CALENDAR = re.compile(r"(?m)^OnCalendar=(.*)$")


def user_dir() -> Path:
    """Where systemd looks for a user's units: $XDG_CONFIG_HOME/systemd/user."""
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


def _value(text: str) -> str:
    """A unit-file value: `%` starts a specifier in systemd, so it is written `%%`."""
    return text.replace("%", "%%")


def _exec_word(path: str) -> str:
    """`path` as the command word of an Exec*= line (where `$` is literal): quoted if need be."""
    word = _value(path)
    if any(char.isspace() or char in "\"'\\;" for char in word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def render_service(template: str, repo: Path, make: str) -> str:
    """The service template with this checkout's paths filled in."""
    return string.Template(template).substitute(
        REPO=_value(str(repo)), MAKE=_exec_word(make),
        PYTHON=_exec_word(str(repo / VENV_PYTHON)),
        DOC_URL=_value((repo / "pipeline" / "commands" / "retrain.py").as_uri()))


def render_timer(timer: str, calendar: str | None) -> str:
    """The timer, with another schedule if one is given: OnCalendar, and the Description and a
    first comment that say so (the template's comments describe its weekly default)."""
    if calendar is None:
        return timer
    timer = _ON_CALENDAR.sub(lambda _: f"OnCalendar={calendar}", timer)
    timer = re.sub(r"(?m)^Description=.*$",
                   lambda _: f"Description=Fashion-MNIST retraining, OnCalendar={calendar}", timer)
    return (f"# Installed with OnCalendar={calendar}; the comments below describe the "
            "template's default.\n" + timer)


def _rendered_header(repo: Path) -> str:
    return (f"# Rendered for {repo} by `python -m pipeline.commands.schedule install-systemd`\n"
            f"# from {TEMPLATE_DIR.relative_to(TEMPLATE_DIR.parents[1])}: edit that and install "
            "again rather than this file.\n")


def unit_files(dest: Path) -> tuple[Path, Path]:
    """The service and the timer in `dest`."""
    return dest / f"{UNIT_NAME}.service", dest / f"{UNIT_NAME}.timer"


def install_units(repo: Path, calendar: str | None, dest: Path) -> str:
    """Write the rendered units into `dest`; returns the timer's OnCalendar."""
    if "\n" in str(repo):
        raise ScheduleError(f"{repo!r}: a path with a newline cannot go in a unit file")
    service_template, timer_template = unit_files(TEMPLATE_DIR)
    service = render_service(service_template.read_text(), repo, make_binary())
    timer = render_timer(timer_template.read_text(), calendar)
    dest.mkdir(parents=True, exist_ok=True)
    header = _rendered_header(repo)
    service_file, timer_file = unit_files(dest)
    atomic_write_text(service_file, header + service)
    atomic_write_text(timer_file, header + timer)
    return installed_calendar(timer) or "?"


def installed_calendar(timer: str) -> str | None:
    """The OnCalendar of a timer's text."""
    found = _ON_CALENDAR.search(timer)
    return found.group(1) if found else None


def timer_enabled(dest: Path) -> bool:
    return (dest / "timers.target.wants" / f"{UNIT_NAME}.timer").exists()


def remove_units(dest: Path) -> list[Path]:
    """Delete the units from `dest` (refused while the timer is enabled); the files removed."""
    if timer_enabled(dest):
        raise ScheduleError(f"the timer is enabled; first run: systemctl --user disable --now "
                            f"{UNIT_NAME}.timer")
    removed = [path for path in unit_files(dest) if path.exists()]
    for path in removed:
        path.unlink()
    return removed
