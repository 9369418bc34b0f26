"""Entry point kept for `python -m pipeline.add_data` (cron and systemd lines, the README)."""

import sys

from pipeline.commands.add_data import main

if __name__ == "__main__":
    sys.exit(main())
