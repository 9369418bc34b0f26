"""Entry point for `python -m pipeline.tune`: the Optuna search, in commands/tune."""

import sys

from pipeline.commands.tune import main

if __name__ == "__main__":
    sys.exit(main())
