"""Benchmark the loop a person lives in: from a parameter change to a registered model.

In a fresh copy of a checkout (its git-tracked and new files, as a clone would have them), on the
real Fashion-MNIST archives, it times:

- `make train` on the fresh copy (download from the local mirror, split, train, evaluate,
  register), with the checkout's virtualenv standing in for `make setup`;
- a no-op `make train`;
- `dvc repro` after one `model.learning_rate` change, against the fit time of that same run
  (`train_seconds` in models/run.json): the ratio is the figure of merit, measured in one run
  so that the load of the machine cancels out;
- each stage's command alone (what DVC runs), after a parameter change;
- `python -m pipeline.predict one.png` with the champion, and a configuration error reported by
  `python -m pipeline.train model.learning_rate=-1` and by a stage.

It exits 1 if a parameter-change `dvc repro` takes more than 6 times the fit time (median).

Usage: python benchmarks/bench_loop.py [--repeats 3] [--checkout PATH]
--checkout measures another checkout's code (e.g. a `git worktree` of an older commit) with this
checkout's virtualenv. Data: the download stage's local mirror ($FMNIST_MIRROR, else
../shared/fashion-mnist next to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.support.workspace import mirror_directory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the copy routine and make's settings are the tests' own
from tests.repo_copy import MAKE, copy_repository  # noqa: E402

VENV = ROOT / ".venv"
RATIO_BAR = 6.0
STAGES = ("train", "evaluate", "register")


class Copy:
    def __init__(self, root: Path, mirror: Path):
        self.root = root
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                    "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
                    "FMNIST_MIRROR": str(mirror)}

    def timed(self, *command: str, expect: int = 0) -> float:
        started = time.perf_counter()
        result = subprocess.run(command, cwd=self.root, env=self.env, capture_output=True,
                                text=True)
        seconds = time.perf_counter() - started
        if result.returncode != expect:
            sys.exit(f"{' '.join(command)} exited {result.returncode}, expected {expect}:\n"
                     f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return seconds

    def make_train(self) -> float:
        return self.timed(*MAKE, "train")

    def set_learning_rate(self, value: float) -> None:
        """Edit conf/ and compose params.yaml, as a user does before `dvc repro`."""
        conf = self.root / "conf" / "model" / "softmax.yaml"
        text, count = re.subn(r"(?m)^(learning_rate: ).*$", rf"\g<1>{value}", conf.read_text())
        assert count == 1, f"{conf} has no learning_rate"
        conf.write_text(text)
        self.timed(*MAKE, "params")

    def fit_seconds(self) -> float:
        return float(json.loads((self.root / "models/run.json").read_text())["train_seconds"])


def write_png(path: Path, mirror: Path) -> None:
    from PIL import Image

    from pipeline.core.idx import read_idx

    Image.fromarray(read_idx(mirror / "t10k-images-idx3-ubyte.gz")[0]).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="the checkout whose code is measured (default: this one)")
    args = parser.parse_args()
    mirror = mirror_directory(ROOT)
    if mirror is None:
        sys.exit("no local mirror of the Fashion-MNIST archives: set FMNIST_MIRROR")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; code from {args.checkout.resolve()}")
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        copy = Copy(Path(tmp), mirror)
        copy_repository(copy.root, args.checkout.resolve())
        record("make train, fresh clone", copy.make_train())
        write_png(copy.root / "one.png", mirror)
        (copy.root / "bad.yaml").write_text(re.sub(
            r"(?m)^(  learning_rate:) .*$", r"\1 -1", (copy.root / "params.yaml").read_text()))
        for repeat in range(args.repeats):
            # A value not run before: DVC's run cache cannot stand in for the work.
            copy.set_learning_rate(round(0.02 + 0.005 * repeat, 3))
            seconds = copy.timed(str(VENV / "bin/dvc"), "repro")
            record("dvc repro after a model.* change", seconds)
            record("fit (train_seconds)", copy.fit_seconds())
            ratios.append(seconds / copy.fit_seconds())
            record("make train, nothing changed", copy.make_train())
            for stage in STAGES:  # each stage alone, as DVC runs it (this changes the outputs)
                record(f"stage {stage}", copy.timed(str(VENV / "bin/python"), "-m",
                                                    f"pipeline.stages.{stage}"))
            record("predict one.png (champion)",
                   copy.timed(str(VENV / "bin/python"), "-m", "pipeline.predict", "one.png"))
            record("configuration error, python -m pipeline.train",
                   copy.timed(str(VENV / "bin/python"), "-m", "pipeline.train",
                              "model.learning_rate=-1", expect=1))
            record("configuration error, train stage",
                   copy.timed(str(VENV / "bin/python"), "-m", "pipeline.stages.train",
                              "--params", "bad.yaml", expect=1))

    print(f"\n{'what':<50}{'median (s)':>12}{'runs':>30}")
    for name, values in times.items():
        runs = ", ".join(f"{value:.2f}" for value in values)
        print(f"{name:<50}{statistics.median(values):>12.2f}{runs:>30}")
    ratio = statistics.median(ratios)
    print(f"\ndvc repro after a model.* change / fit time: median {ratio:.1f}x "
          f"(runs: {', '.join(f'{r:.1f}' for r in ratios)}; bar <= {RATIO_BAR:g}x)")
    return 0 if ratio <= RATIO_BAR else 1


if __name__ == "__main__":
    sys.exit(main())
