"""What both schedulers of the retraining cycle share: the presets, the virtualenv, `make`.

`cron` writes one line into the user's crontab; `systemd` renders the user units kept under
deploy/systemd/. Both run the same two commands in the checkout: `make -s setup`, then the cycle
itself (`.venv/bin/python -m pipeline.retrain --no-wait`) without make, which would turn its exit
code 75 ("another cycle is running") into 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.core.errors import PipelineError

PRESETS = {  # cron expression, systemd OnCalendar: minute 17, off the hour many jobs run at
    "weekly": ("17 3 * * 1", "Mon *-*-* 03:17:00"),
    "daily": ("17 3 * * *", "*-*-* 03:17:00"),
    "hourly": ("17 * * * *", "*-*-* *:17:00"),
}
DEFAULT_EVERY = "weekly"
VENV_PYTHON = Path(".venv") / "bin" / "python"  # the Makefile's virtualenv, from the repo root


class ScheduleError(PipelineError):
    """Cannot (un)install the schedule; the message says what to do instead."""


def make_binary() -> str:
    """The absolute path of `make`: cron's and systemd's PATH may not hold it."""
    make = shutil.which("make")
    if make is None:
        raise ScheduleError("`make` not found on PATH; install it (apt-get install make)")
    return make
