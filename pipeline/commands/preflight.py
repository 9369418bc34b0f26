"""Before `dvc repro` (`make train`): the tracking server answers and takes our credentials.

One bounded request, so a server that is down or refuses us costs seconds and one line, not
MLflow's minutes of retries in the middle of a stage. A local store needs no check. The messages
keep the `team:` prefix they had when this was `python -m pipeline.commands.team check`.

It also closes, as FAILED (killed), the runs of this host whose process is gone
(`tracking.fail_killed_runs`): `dvc repro` with nothing to do runs no stage that would. On the
sqlite store one read-only query decides whether MLflow is needed at all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.support import config, errors, store, tracking


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.preflight",
                                     description="Check that the MLflow tracking store answers.")
    parser.add_argument("--params", default=config.PARAMS_FILE)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params).mlflow
        uri = store.preflight(cfg)
        if tracking.killed_runs_suspected(uri, cfg.experiment):
            store.connect(cfg, experiment=False)
            tracking.fail_killed_runs(cfg.experiment)
    except (config.ConfigError, store.StoreUnavailable, store.StoreError) as exc:
        errors.show_traceback(exc)
        print(f"team: error: {exc}", file=sys.stderr)
        return 1
    print(f"team: the tracking store {uri} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
