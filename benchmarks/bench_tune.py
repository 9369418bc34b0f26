"""Benchmark `make tune`: trials per minute with 1 and with 2 workers, in the same run.

Both measurements run `python -m pipeline.tune` on the real data (data/split, from `make data`)
with the same fixed configuration in every trial (the search space is one point, pruning off),
so the two runs do the same work and only the number of workers differs. Each uses a fresh
study store and MLflow store in a temporary folder, so the project's stores are untouched.

Printed: trials per minute for each, the 2-worker speed-up, and the overhead per trial beyond
the fit: (wall time of the trials - sum of the fits) / trials for 1 worker, which counts MLflow
logging, validation scoring and Optuna's storage, not the start-up (imports, data loading) that
is paid once per worker. Targets: overhead <= 1 s, speed-up >= 1.6x; the script exits 1 if
either is missed. On a machine shared with other work, the numbers move with its load.

Usage: python benchmarks/bench_tune.py [--trials 12]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_OVERHEAD_SECONDS = 1.0
MIN_SPEEDUP = 1.6
# One point: every trial trains the default model (the objective's value is then the same).
ONE_POINT = "search.space={epochs: {type: categorical, choices: [5]}}"


def run(trials: int, workers: int, scratch: Path) -> dict[str, float]:
    """One `pipeline.tune` invocation in its own stores; its timings from the stores."""
    scratch.mkdir()
    env = {**os.environ, "OPTUNA_STORAGE": f"sqlite:///{scratch / 'optuna.db'}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.tune", "--trials", str(trials), "--workers",
         str(workers), "--study", "bench", "--seed", "0", "search.pruner=none",
         "~search.space", f"+{ONE_POINT}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    total = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"bench_tune: pipeline.tune failed:\n{result.stderr[-3000:]}")
    study = optuna.load_study(study_name="bench", storage=env["OPTUNA_STORAGE"])
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    span = (last - first).total_seconds()
    fits = sum(t.user_attrs["train_seconds"] for t in done)
    return {"trials": len(done), "total": total, "span": span, "fits": fits,
            "per_minute": 60 * len(done) / span}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args(argv)
    if not (REPO_ROOT / "data" / "split" / "train.npz").is_file():
        sys.exit("bench_tune: data/split not found: run `make data` first")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        one = run(args.trials, 1, Path(folder) / "one")
        two = run(args.trials, 2, Path(folder) / "two")
    print(f"{'workers':>7} {'trials':>6} {'trials/min':>10} {'trials span s':>13} "
          f"{'sum of fits s':>13} {'command s':>9}")
    for workers, r in ((1, one), (2, two)):
        print(f"{workers:>7} {r['trials']:>6} {r['per_minute']:>10.1f} {r['span']:>13.1f} "
              f"{r['fits']:>13.1f} {r['total']:>9.1f}")
    overhead = (one["span"] - one["fits"]) / one["trials"]
    speedup = two["per_minute"] / one["per_minute"]
    print(f"overhead per trial beyond the fit (1 worker): {overhead:.2f} s "
          f"(fit {one['fits'] / one['trials']:.2f} s per trial)")
    print(f"2 workers / 1 worker throughput: {speedup:.2f}x")
    print(f"command s includes start-up (imports, data loading per worker), the final retrain, "
          f"evaluation and registration; {os.cpu_count()} CPUs, shared: numbers vary with load")
    overhead_ok, speedup_ok = overhead <= MAX_OVERHEAD_SECONDS, speedup >= MIN_SPEEDUP
    print(f"bar: overhead {overhead:.2f} s <= {MAX_OVERHEAD_SECONDS} s "
          f"{'OK' if overhead_ok else 'MISSED'}; speed-up {speedup:.2f}x >= {MIN_SPEEDUP}x "
          f"{'OK' if speedup_ok else 'MISSED'}")
    return 0 if overhead_ok and speedup_ok else 1


if __name__ == "__main__":
    sys.exit(main())
