"""The promotion gate's MLflow side: fetch both versions' test predictions, then apply the rule.

The statistics are in `pipeline.core.paired_tests` and the rule in `pipeline.core.promotion`;
here are the reads: each run's `evaluation/test_predictions.npz`, logged by its evaluate stage,
so the gate compares the challenger with the champion image by image without loading or
retraining either model. Two versions scored on different test sets are never compared, and a
predictions file whose bytes are not those its run recorded at evaluation is never read.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.files import read_bounded
from pipeline.core.paired_tests import (
    PREDICTIONS_FILE,
    PredictionsFileError,
    ScoredPredictions,
    mcnemar,
    paired_bootstrap,
    predictions_from_arrays,
)
from pipeline.core.promotion import Decision, decide, decide_paired
from pipeline.support import model_loader
from pipeline.support.config import PromotionConfig

ARTIFACT_DIR = "evaluation"
ARTIFACT_PATH = f"{ARTIFACT_DIR}/{PREDICTIONS_FILE}"
DIGEST_CHARS = 16  # of a test set's SHA-256 in messages: enough to tell two apart
# The run tag the evaluate stage sets to the SHA-256 of the predictions file it logged.
PREDICTIONS_DIGEST_TAG = "test_predictions_sha256"
# About 100 KB for 10,000 test images; a file far larger is not one the evaluate stage wrote.
MAX_PREDICTIONS_BYTES = 64 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 of a predictions file (a regular file of at most MAX_PREDICTIONS_BYTES)."""
    return hashlib.sha256(read_bounded(path, MAX_PREDICTIONS_BYTES)).hexdigest()


def logged_predictions(client: Any, run_id: str) -> ScoredPredictions | None:
    """The run's per-image test predictions; None if its evaluate stage logged none (a version
    registered before the gate).

    The file must hash to the run's PREDICTIONS_DIGEST_TAG, so that whoever can write to the
    artifact store cannot make a weak model win (or a strong one lose) by editing predictions;
    runs evaluated before the tag existed are read as they are.
    """
    listed = {entry.path for entry in client.list_artifacts(run_id, ARTIFACT_DIR)}
    if ARTIFACT_PATH not in listed:
        return None
    expected = client.get_run(run_id).data.tags.get(PREDICTIONS_DIGEST_TAG)
    with tempfile.TemporaryDirectory(prefix="fmnist-gate-") as folder:
        local = model_loader.download_run_files(run_id, ARTIFACT_PATH, folder)
        name = f"run {run_id} {ARTIFACT_PATH}"
        data = read_bounded(local, MAX_PREDICTIONS_BYTES)  # read once: hashed, then loaded
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise PredictionsFileError(
            f"{name} has SHA-256 {actual}, but the run recorded {expected} "
            f"({PREDICTIONS_DIGEST_TAG}) when it was evaluated: the file was replaced or "
            "damaged, so the gate compares nothing and no alias moves")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return predictions_from_arrays(dict(arrays), name)
    except (OSError, ValueError) as exc:
        if isinstance(exc, PredictionsFileError):
            raise
        raise PredictionsFileError(f"{name} is not a readable npz file: {exc}") from None


def judge(client: Any, rule: PromotionConfig, candidate_run_id: str, candidate_value: float,
          champion: Any | None, champion_value: float | None) -> Decision:
    """The promotion decision for the candidate run against `champion` (a model version)."""
    if champion is None or champion_value is None or rule.test == "none":
        return decide(candidate_value, champion_value, rule.metric, rule.greater_is_better,
                      rule.min_improvement)
    challenger = logged_predictions(client, candidate_run_id)
    if challenger is None:
        return Decision(False, f"run {candidate_run_id} has no per-image test predictions "
                               f"({ARTIFACT_PATH}): run its evaluate stage again",
                        {"test": rule.test})
    held = logged_predictions(client, champion.run_id)
    if held is None:
        # Registered before the gate existed: no pairs to test. The raw rule, said as such.
        raw = decide(candidate_value, champion_value, rule.metric, rule.greater_is_better,
                     rule.min_improvement)
        return Decision(raw.promote, f"{raw.reason}; untested: champion version "
                                     f"{champion.version} has no per-image test predictions",
                        {"test": "none"})
    if held.digest != challenger.digest or not np.array_equal(held.labels, challenger.labels):
        return Decision(False, f"not comparable, champion kept: champion version "
                               f"{champion.version} was scored on test set "
                               f"{held.digest[:DIGEST_CHARS]}, this run on "
                               f"{challenger.digest[:DIGEST_CHARS]}",
                        {"test": rule.test, "champion_test_digest": held.digest,
                         "candidate_test_digest": challenger.digest})
    if rule.test == "mcnemar":
        evidence = mcnemar(held.labels == held.predicted, challenger.labels == challenger.predicted)
    else:
        evidence = paired_bootstrap(held, challenger, rule.metric.removeprefix("test_"),
                                    rule.greater_is_better, rule.alpha, rule.bootstrap_samples)
    decision = decide_paired(candidate_value, champion_value, rule.metric, evidence,
                             rule.greater_is_better, rule.min_improvement, rule.alpha)
    return Decision(decision.promote, decision.reason,
                    {**decision.statistics, "test_digest": held.digest})
