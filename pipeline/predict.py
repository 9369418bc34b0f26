"""Entry point kept for `python -m pipeline.predict` (cron and systemd lines, the README)."""

import sys

from pipeline.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
