"""Stage `evaluate`: score the trained model on the official test set and on validation.

Usage: python -m pipeline.stages.evaluate [--params params.yaml]

Writes the DVC metrics file, one prediction table per split for DVC's confusion-matrix plot, and
figures and tables under reports/; logs all of them to the pipeline's MLflow run. The test
predictions are also kept per image with the test set's digest (evaluation/test_predictions.npz),
for the register stage's promotion gate, and the file's SHA-256 as the run's tag
`test_predictions_sha256`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.files import atomic_write_text, write_npz
from pipeline.core.paired_tests import PREDICTIONS_FILE, digest_of_test_set, prediction_arrays
from pipeline.core.split import load_split
from pipeline.support import config, tracking
from pipeline.support.outputs import Outputs
from pipeline.support.stage import stage_main

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.core.metrics import Evaluation

# pandas, scikit-learn, matplotlib and MLflow are imported where used: `python -m pipeline.train`
# imports this module, and reports a configuration error before any of them is needed.

SPLITS = ("test", "val")


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def record_split(
    split: str, evaluation: Evaluation, X: np.ndarray, y: np.ndarray, proba: np.ndarray,
    class_names: list[str], out: Outputs,
) -> None:
    """Files for DVC and people, and the same figures and tables in the MLflow run."""
    import numpy as np
    import pandas as pd

    from pipeline.support import figures

    y_pred = proba.argmax(axis=1)
    names = np.asarray(class_names)
    # For `dvc plots`: the names, and the integer labels that put the confusion matrix's axes in
    # label order, as in the PNG (the templates in .dvc/plots/ sort by them; DVC would sort the
    # names alphabetically).
    _write_csv(pd.DataFrame({"actual": names[y], "predicted": names[y_pred],
                             "actual_label": y, "predicted_label": y_pred}),
               out.predictions(split))
    out.evaluation.mkdir(parents=True, exist_ok=True)
    tables = {
        f"confusion_{split}.csv": evaluation.confusion_table.reset_index(),
        f"per_class_{split}.csv": evaluation.per_class,
        f"top_confusions_{split}.csv": evaluation.top_confusions,
    }
    for name, table in tables.items():  # logged with the figures by `run`, as CSV files
        _write_csv(table, out.evaluation / name)

    drawings = {
        f"confusion_{split}.png": lambda: figures.confusion_matrix_figure(
            evaluation.confusion, class_names, f"Confusion matrix ({split}, counts)",
            normalized=False),
        f"confusion_{split}_normalized.png": lambda: figures.confusion_matrix_figure(
            evaluation.confusion_normalized, class_names,
            f"Confusion matrix ({split}, share of each actual class)", normalized=True),
    }
    if split == "test":
        # Per image, for the promotion gate of later runs (pipeline.core.paired_tests): the
        # register stage compares two versions on these without loading either model.
        write_npz(out.evaluation / PREDICTIONS_FILE,
                  prediction_arrays(y, proba, digest_of_test_set(X, y)))
        drawings["misclassified_test.png"] = lambda: figures.misclassified_figure(
            X, y, y_pred, proba.max(axis=1), class_names)
    for name, draw in drawings.items():
        figure = draw()
        figures.save(figure, out.evaluation / name)  # drawn once; the file goes to MLflow
        figures.close(figure)


def run(cfg: config.Config, out: Outputs, run_id: str) -> dict[str, dict[str, float]]:
    """Evaluate `out.model` inside MLflow run `run_id`; returns the metrics per split."""
    import mlflow

    from pipeline.core.metrics import evaluate_predictions
    from pipeline.support import model_loader, promotion_gate

    model = model_loader.load(out.model)
    class_names = list(cfg.data.class_names)
    results: dict[str, dict[str, float]] = {}
    with tracking.resume(run_id, allow_failed=True):
        for split in SPLITS:
            X, y = load_split(cfg.data.split_dir, split)
            proba = model.predict_proba(X)
            evaluation = evaluate_predictions(y, proba, class_names)
            results[split] = evaluation.scalars
            mlflow.log_metrics({f"{split}_{k}": v for k, v in evaluation.scalars.items()})
            record_split(split, evaluation, X, y, proba, class_names, out)
        mlflow.log_artifacts(str(out.evaluation), artifact_path="evaluation")
        # What the promotion gate of a later run checks the downloaded file against.
        mlflow.set_tag(promotion_gate.PREDICTIONS_DIGEST_TAG,
                       promotion_gate.file_sha256(out.evaluation / PREDICTIONS_FILE))
        tracking.log_comparable(out.evaluation)  # for the compare page
        atomic_write_text(out.evaluate_metrics, json.dumps(results, indent=2) + "\n")
    return results


def format_results(results: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(results.values())))
    lines = [f"{'metric':<20}" + "".join(f"{split:>10}" for split in results)]
    lines += [f"{key:<20}" + "".join(f"{results[s][key]:>10.4f}" for s in results) for key in keys]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    def evaluate(cfg: config.Config) -> str:
        run_id = tracking.read_run_file(Outputs().run)["run_id"]
        return format_results(run(cfg, Outputs(), run_id))

    return stage_main("evaluate", "Score the trained model on test and validation.", argv,
                      evaluate)


if __name__ == "__main__":
    sys.exit(main())
