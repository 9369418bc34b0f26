"""Entry point kept for `python -m pipeline.retrain` (cron and systemd lines, the README)."""

import sys

from pipeline.commands.retrain import main

if __name__ == "__main__":
    sys.exit(main())
