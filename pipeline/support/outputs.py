"""Where the train, evaluate and register stages write, in one place.

DVC runs use the project root, so the paths match `dvc.yaml` (a test keeps them in step); a
direct Hydra run or sweep point uses its own output directory, so runs never overwrite each other.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

HYDRA_FILES = (".hydra",)  # Hydra's copy of the composed config; its `<job>.log` too


@dataclass(frozen=True)
class Outputs:
    root: Path = Path(".")

    @property
    def model(self) -> Path:
        return self.root / "models" / "model.skops"

    @property
    def run(self) -> Path:
        return self.root / "models" / "run.json"

    @property
    def registration(self) -> Path:
        return self.root / "models" / "registration.json"

    @property
    def train_metrics(self) -> Path:
        return self.root / "metrics" / "train.json"

    @property
    def evaluate_metrics(self) -> Path:
        return self.root / "metrics" / "evaluate.json"

    @property
    def history(self) -> Path:
        return self.root / "plots" / "history.csv"

    def predictions(self, split: str) -> Path:
        """One row per image (actual, predicted class names): DVC's confusion-matrix input."""
        return self.root / "plots" / f"predictions_{split}.csv"

    @property
    def learning_curves(self) -> Path:
        return self.root / "reports" / "learning_curves.png"

    @property
    def evaluation(self) -> Path:
        """Figures and tables for people: confusion matrices, per-class scores, mistakes."""
        return self.root / "reports" / "evaluation"


def remove_if_unused(run_dir: Path, top: Path) -> bool:
    """Delete a Hydra run folder that holds only Hydra's own files (a refused configuration
    wrote nothing), and the folders above it up to `top` that it leaves empty."""
    run_dir, top = run_dir.absolute(), top.absolute()
    if not run_dir.is_dir() or top not in run_dir.parents:
        return False
    if any(entry.name not in HYDRA_FILES and entry.suffix != ".log"
           for entry in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != top and top in parent.parents:
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent
    return True
