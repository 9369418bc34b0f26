"""The table at the end of `make train`: what was trained, how it scored, who is champion.

Usage: python -m pipeline.commands.summary
"""

from __future__ import annotations

import sys

from pipeline.support.outputs import Outputs
from pipeline.support.summary_table import format_run_summary


def main() -> int:
    if not Outputs().run.exists():
        print("summary: no run yet: run `make train`", file=sys.stderr)
        return 1
    print(format_run_summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
