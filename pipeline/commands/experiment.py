"""A direct Hydra run or sweep: train, evaluate and register in one process, one MLflow run.

Usage: python -m pipeline.train [HYDRA_OVERRIDE ...]        (one run, e.g. model.epochs=6)
       python -m pipeline.train -m model.learning_rate=0.01,0.1   (a sweep: one run per point)

conf/ is composed with the overrides (no params.yaml, no DVC), and the stages' own functions run
one after the other, writing into Hydra's output directory, so the points of a sweep never
overwrite each other or the DVC outputs. This is the only module that chains stages by calls;
`dvc repro` chains the same stages through files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.stages import evaluate, register, train
from pipeline.support import config, models, store, tracking
from pipeline.support.outputs import Outputs
from pipeline.support.run_summary import format_run_summary
from pipeline.support.workspace import CONFIG_DIR

# An absolute path: Hydra would read a relative one as a Python package when this function is
# reached through the `pipeline.train` entry point.
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / CONFIG_DIR)


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base=None)
def main(raw: DictConfig) -> float | None:
    """One point: its promotion metric is the return value (a sweeper may read it)."""
    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    tracking.fail_runs_on_sigterm()
    out = Outputs(Path(hydra_cfg.runtime.output_dir))
    try:
        try:
            cfg = config.validate(OmegaConf.to_container(raw, resolve=True))
            models.check_params(cfg.model)
        except config.ConfigError as exc:
            raise config.ConfigError(f"conf/ with your overrides: {exc}") from None
        store.connect(cfg.mlflow)
        record = train.train(cfg, out, "hydra", list(hydra_cfg.overrides.task))
        results = evaluate.run(cfg, out, record["run_id"])
        register.run(cfg, out, record["run_id"], record["model_uri"])
    except tracking.expected_errors() as exc:
        print(f"train: error: {tracking.explain(exc)}", file=sys.stderr)
        # This point's run is FAILED; the other points of the sweep still run, unless the
        # tracking server is out of reach, which no point can get past.
        if sweeping and not isinstance(exc, store.StoreUnavailable):
            return None
        sys.exit(1)
    print(format_run_summary(out))
    return results["test"][cfg.mlflow.promotion.metric.removeprefix("test_")]


if __name__ == "__main__":
    main()
