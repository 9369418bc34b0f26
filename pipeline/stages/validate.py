"""Stage `validate`: check the whole composed configuration before any stage deletes an output.

Usage: python -m pipeline.stages.validate [--params params.yaml]

DVC deletes a stage's outputs just before running it, so a value that only the train stage
refused (`dvc exp run -S model.learning_rate=nan`) used to leave the workspace without a model.
This stage has no outputs and comes first in dvc.yaml: it checks the schema, the model's own
parameters and the keys whose valid values depend on others, and a refusal stops DVC before
anything is deleted. The message says how to get params.yaml back.

Cross-key checks: `data.val_size` against the per-class counts of the official training set
(when the download stage has fetched it; the split stage checks again in any case), and
`model.batch_size` against the size of the training set that this `val_size` leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.idx import IdxFormatError, read_idx
from pipeline.core.split import N_CLASSES, DatasetError, check_val_size
from pipeline.support import config, errors, estimators

# `make params` first: after `dvc exp run -S`, git may not notice the change (same size and a
# refreshed index), and `git checkout params.yaml` then silently does nothing.
HOW_TO_GET_BACK = ("nothing was run or deleted; to get back, compose conf/ again with "
                   "`make params` (or restore the committed file: `git checkout params.yaml`)")


def official_class_counts(data: config.DataConfig) -> np.ndarray | None:
    """Training images per class in the raw labels archive; None before the download stage."""
    labels = Path(data.raw_dir) / data.files["train_labels"].name
    if not labels.is_file():
        return None
    try:
        return np.bincount(read_idx(labels, kind="labels"), minlength=N_CLASSES)
    except IdxFormatError:
        return None  # the download stage fetches it again and the split stage checks it


def check(cfg: config.Config) -> str:
    """Every problem that a later stage would meet in the configuration, as a ConfigError."""
    spec = estimators.check_params(cfg.model)
    counts = official_class_counts(cfg.data)
    n_official = int(counts.sum()) if counts is not None else config.N_OFFICIAL_TRAIN
    if counts is not None:
        try:
            check_val_size(counts, cfg.data.val_size)
        except DatasetError as exc:
            raise config.ConfigError(str(exc)) from None
    batch_size = spec.all_params.get("batch_size")
    n_train = n_official - cfg.data.val_size
    if isinstance(batch_size, int) and batch_size > n_train:
        raise config.ConfigError(
            f"model.batch_size={batch_size} is invalid: the training set has {n_train} images "
            f"(data.val_size={cfg.data.val_size} of {n_official} go to validation); expected "
            f"at most {n_train}")
    checked = "val_size against the class counts, " if counts is not None else ""
    return f"validate: configuration valid ({checked}batch_size against the training set)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.validate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=config.PARAMS_FILE, help="composed parameter file")
    args = parser.parse_args(argv)
    try:
        print(check(config.load(args.params)))
    except config.ConfigError as exc:
        errors.show_traceback(exc)
        print(f"validate: error: {exc}\n{HOW_TO_GET_BACK}", file=sys.stderr)
        return 1
    except OSError as exc:  # the raw labels archive cannot be read
        errors.show_traceback(exc)
        print(f"validate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
