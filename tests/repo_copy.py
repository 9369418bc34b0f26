"""A copy of this repository in a temporary folder, driven like a user drives it.

End-to-end tests run real DVC, real MLflow (a sqlite store inside the copy) and the stages as
subprocesses, on synthetic data served from a local folder mirror.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.synthetic import REPO_ROOT, data_params, write_archives

MODEL_NAME = "fashion-mnist-softmax"
BIN = Path(sys.executable).parent
# `make` in a copy, with this checkout's virtualenv. --assume-old keeps make from re-running
# `uv sync` there (the copy's uv.lock is newer than the venv's stamp): that would point the
# venv's editable install of `pipeline` at the copy, a folder deleted after the tests.
MAKE = ("make", "--no-print-directory", f"VENV={BIN.parent}",
        f"--assume-old={BIN.parent / '.installed'}")


def copy_repository(destination: Path, checkout: Path = REPO_ROOT) -> None:
    """The files a clone of `checkout` would have (tracked, plus new files not ignored), in a
    fresh git repo (benchmarks/bench_loop.py copies another checkout with it too)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=checkout, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = checkout / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    subprocess.run(["git", "add", "-A"], cwd=destination, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=destination, check=True)


class Repo:
    def __init__(self, root: Path, mirror: Path):
        self.root = root
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "FMNIST_MIRROR": str(mirror),
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }

    def run(self, *command: str, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """`command` in the copy; past `timeout` it fails the test, its whole process group
        stopped (a server it started included)."""
        process = subprocess.Popen(command, cwd=self.root, env=self.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(command)} did not finish within {timeout:g} s\n"
                        f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}")
        result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(command)} exited {result.returncode}\n"
                        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
        return result

    def dvc(self, *args: str, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "dvc"), *args, check=check, timeout=timeout)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: dict) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def json(self, relative: str) -> dict:
        return json.loads((self.root / relative).read_text())

    def client(self):
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(f"sqlite:///{self.root / 'mlflow.db'}")
        return MlflowClient()


def make_repo(root: Path, mirror: Path, n_train_per_class: int = 60, n_test_per_class: int = 20,
              val_size: int = 120, seed: int = 3) -> Repo:
    """A committed copy of the project whose conf/ and params.yaml use synthetic archives.

    conf/data is rewritten and params.yaml composed from conf/ as `make params` would, so
    `dvc exp run -S ...` (which recomposes conf/) works on the copy too.
    """
    from pipeline.support.composition import compose

    specs = write_archives(mirror, n_train_per_class=n_train_per_class,
                           n_test_per_class=n_test_per_class, seed=seed)
    copy_repository(root)
    data = data_params(specs, val_size=val_size)
    (root / "conf" / "data" / "fashion_mnist.yaml").write_text(
        yaml.safe_dump(data, sort_keys=False))
    # The validate stage refuses a batch larger than the training set; the default (512) is.
    n_train = 10 * n_train_per_class - val_size
    softmax = root / "conf" / "model" / "softmax.yaml"
    batch = int(yaml.safe_load(softmax.read_text())["batch_size"])
    if batch > n_train:
        softmax.write_text(softmax.read_text().replace(f"batch_size: {batch}",
                                                       f"batch_size: {n_train}", 1))
    (root / "params.yaml").write_text(compose(root))
    (root / "data" / "extra").mkdir(parents=True, exist_ok=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "commit", "-qam", "synthetic data"], cwd=root, check=True)
    return Repo(root, mirror)
