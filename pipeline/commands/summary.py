"""The table at the end of `make train`: what was trained, how it scored, who is champion.

Usage: python -m pipeline.commands.summary [--reproduce]

It reports only a run and a version that the current MLflow store holds (`store_records`): after
a switch of store, DVC finds every stage up to date while the new store has never seen the run.
With --reproduce (`make train`) the stages that record them are redone in this store
(`dvc repro --force --downstream <stage>`); without it, or if that fails, it exits 1 with the
command to run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.support import config, errors, store_records
from pipeline.support.outputs import Outputs
from pipeline.support.summary_table import format_run_summary


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else "dvc"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.summary",
                                     description="Summarise the last run of the pipeline.")
    parser.add_argument("--params", default=config.PARAMS_FILE)
    parser.add_argument("--reproduce", action="store_true",
                        help="redo the stages whose records the current store lacks")
    args = parser.parse_args(argv)
    out = Outputs()
    if not out.run.exists() and not args.reproduce:
        print("summary: no run yet: run `make train`", file=sys.stderr)
        return 1
    try:
        cfg = config.load(args.params).mlflow
        records, uri = store_records.open_reader(cfg)
        missing = store_records.check(cfg, out, records, uri)
        if missing is not None and args.reproduce:
            print(f"summary: {missing.reason}: recording it in this store: {missing.command}",
                  file=sys.stderr, flush=True)
            if subprocess.run([_dvc(), *missing.dvc_args]).returncode == 0:
                missing = store_records.check(cfg, out, records, uri)
        if missing is not None:
            print(f"summary: error: {missing.reason}; record it in this store with "
                  f"`{missing.command}`", file=sys.stderr)
            return 1
        champion = store_records.champion_now(cfg, records)
    except errors.expected() as exc:
        errors.report("summary", exc)
        return 1
    print(format_run_summary(out, champion_now=champion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
