"""Compose `conf/` into `params.yaml`, exactly as `dvc exp run` does.

DVC composes Hydra configs only in `dvc exp run`; `make params` calls this module so that plain
`dvc repro` and `make train` see conf/ edits too. Using DVC's own function keeps the file
byte-identical to what `dvc exp run` writes.

Usage: python -m pipeline.commands.params [--check] [--debug] [HYDRA_OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipeline.core.files import atomic_write_text
from pipeline.support import config, errors, estimators
from pipeline.support.composition import CONFIG_NAME, compose
from pipeline.support.workspace import CONFIG_DIR


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.commands.params", description="Compose conf/ into params.yaml."
    )
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if params.yaml differs from the composition of conf/")
    parser.add_argument("--output", default=config.PARAMS_FILE)
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, e.g. model.learning_rate=0.01")
    args = parser.parse_args(argv)

    root = Path.cwd()
    output = Path(args.output)
    try:
        text = compose(root, args.overrides)
    except Exception as exc:  # Hydra raises several types for a bad conf/ or override
        errors.report("params", exc, args.debug,
                      message=f"cannot compose {CONFIG_DIR}/{CONFIG_NAME}.yaml: {exc}")
        return 1
    current = output.read_text() if output.exists() else None
    if args.check:
        if current != text:
            print(f"params: {output} differs from the composition of {CONFIG_DIR}/; "
                  "run `make params` and commit the result", file=sys.stderr)
            return 1
        print(f"params: {output} matches {CONFIG_DIR}/")
        return 0
    if current == text:  # checked when it was written, and by the validate stage
        print(f"params: {output} is up to date")
        return 0
    try:
        estimators.check_params(config.validate(yaml.safe_load(text)).model)
    except config.ConfigError as exc:
        errors.report("params", exc, args.debug,
                      message=f"{CONFIG_DIR}/ composes to an invalid configuration: {exc}")
        return 1
    atomic_write_text(output, text)
    print(f"params: wrote {output} from {CONFIG_DIR}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
