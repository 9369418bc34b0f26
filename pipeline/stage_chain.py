"""Train, evaluate and register in one process: the one module that chains the stages by calls.

`dvc repro` chains the same stages through files (dvc.yaml). Two commands need them in one
process instead, writing into a folder of their own so that they never overwrite the DVC
outputs: the direct Hydra run and sweep (`python -m pipeline.train`, commands/hydra_run.py) and
tune, which retrains its best trial (commands/tune.py). One chain is one MLflow run, as in
`dvc repro`: train opens it, evaluate and register resume it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.stages import evaluate, register, train
from pipeline.support import config, tracking
from pipeline.support.outputs import Outputs


@dataclass(frozen=True)
class Chained:
    """What one chain left: the run file's record, the scores per split, the registration."""

    run: dict[str, Any]  # run_id, model_uri, ... as in models/run.json
    results: dict[str, dict[str, float]]  # metrics/evaluate.json
    registration: dict[str, Any] | None  # models/registration.json; None: not registered


def run_chain(cfg: config.Config, out: Outputs, source: str, overrides: Sequence[str] = (),
              tags: Mapping[str, str] | None = None, register_model: bool = True) -> Chained:
    """train -> evaluate -> register (unless `register_model` is false) into `out`.

    `source` and `overrides` are recorded on the run as the train stage records them; `tags` are
    added to the run once it exists. An exception marks the run FAILED and propagates.
    """
    record = train.train(cfg, out, source, overrides)
    if tags:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(record["run_id"], key, value)
    results = evaluate.run(cfg, out, record["run_id"])
    registration = (register.run(cfg, out, record["run_id"], record["model_uri"])
                    if register_model else None)
    return Chained(record, results, registration)


def register_trained(cfg: config.Config, out: Outputs) -> dict[str, Any]:
    """Register the run that an earlier, unregistered chain left in `out` (a sweep's best point)."""
    run_file = tracking.read_run_file(out.run)
    return register.run(cfg, out, run_file["run_id"], run_file["model_uri"])
