"""A direct Hydra run or sweep: train, evaluate and register in one process, one MLflow run.

Usage: python -m pipeline.train [HYDRA_OVERRIDE ...]        (one run, e.g. model.epochs=6)
       python -m pipeline.train -m model.learning_rate=0.01,0.1   (a sweep: one run per point)

A sweep selects on validation, never on test: each point trains and evaluates, and when the
sweep ends, `RegisterBestPoint` (a Hydra callback configured in conf/config.yaml) offers only the
point with the best validation score to the champion rule, so a sweep adds at most one model
version. A sweep whose points all failed exits 1.

conf/ is composed with the overrides (no params.yaml, no DVC), and the stages run one after the
other in this process (`pipeline.stage_chain`, which tune uses too), writing into Hydra's output
directory, so the points of a sweep never overwrite each other or the DVC outputs.

Errors: as the stages' (`pipeline.support.errors`); Hydra owns the command line, so only
FMNIST_DEBUG=1 asks for the traceback of an expected error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import stage_chain
from pipeline.stages import validate
from pipeline.support import config, errors, store, tracking
from pipeline.support.outputs import Outputs, remove_if_unused
from pipeline.support.summary_table import format_run_summary
from pipeline.support.workspace import CONFIG_DIR

# An absolute path: Hydra would read a relative one as a Python package when this function is
# reached through the `pipeline.train` entry point.
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / CONFIG_DIR)


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base=None)
def main(raw: DictConfig) -> float | None:
    """One point: its promotion metric on validation is the return value (for a sweeper)."""
    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    tracking.fail_runs_on_sigterm()
    out = Outputs(Path(hydra_cfg.runtime.output_dir))
    try:
        try:
            cfg = config.validate(OmegaConf.to_container(raw, resolve=True))
            validate.check(cfg)  # what the validate stage checks before `dvc repro` runs
        except config.ConfigError as exc:
            raise config.ConfigError(f"conf/ with your overrides: {exc}") from exc
        store.connect(cfg.mlflow)
        tracking.fail_killed_runs(cfg.mlflow.experiment)
        # A sweep registers its best point only, when it ends.
        chained = stage_chain.run_chain(cfg, out, "hydra", list(hydra_cfg.overrides.task),
                                        register_model=not sweeping)
    except errors.expected() as exc:
        errors.report("train", exc)
        # A refused configuration (or a store out of reach) wrote nothing: no empty
        # outputs/<date>/<time>/ folder left behind.
        remove_if_unused(out.root, Path.cwd())
        # This point's run is FAILED; the other points of the sweep still run, unless the
        # tracking server is out of reach, which no point can get past.
        if sweeping and not isinstance(exc, store.StoreUnavailable):
            return None
        sys.exit(1)
    print(format_run_summary(out))
    return chained.results["val"][_split_key(cfg.mlflow.promotion)]


def _split_key(rule: config.PromotionConfig) -> str:
    """The promotion metric's name inside one split of metrics/evaluate.json."""
    return rule.metric.removeprefix("test_")


def best_point(points: list[Outputs], rule: config.PromotionConfig) -> Outputs | None:
    """The point with the best promotion metric measured on validation (None: none finished)."""
    scored = []
    for point in points:
        try:
            value = json.loads(point.evaluate_metrics.read_text())["val"][_split_key(rule)]
        except (OSError, ValueError, KeyError):  # a point that failed before evaluating
            continue
        scored.append((value if rule.greater_is_better else -value, str(point.root), point))
    return max(scored, key=lambda item: item[:2])[2] if scored else None


class RegisterBestPoint(Callback):
    """At the end of a sweep: register the point that is best on validation, and only that one."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline.support.config import validate
        from pipeline.support.registration_file import describe, registration_from_record

        cfg = validate({key: OmegaConf.to_container(config[key], resolve=True)
                               for key in config if key != "hydra"})
        sweep = Path(config.hydra.sweep.dir)
        # Only this sweep's points: a reused sweep folder may hold older ones.
        points = [Outputs(run.parents[1]) for run in sorted(sweep.glob("*/models/run.json"))
                  if run.stat().st_mtime >= getattr(self, "started", 0)]
        best = best_point(points, cfg.mlflow.promotion)
        if best is None:
            print(f"train: error: every point of the sweep in {sweep} failed; nothing was "
                  "registered", file=sys.stderr)
            sys.exit(1)
        try:
            store.connect(cfg.mlflow)
            record = stage_chain.register_trained(cfg, best)
        except errors.expected() as exc:
            errors.report("train", exc, message=f"registering the sweep's best point "
                                                f"{best.root}: {errors.explain(exc)}")
            sys.exit(1)
        print(f"train: best point by validation {_split_key(cfg.mlflow.promotion)}: {best.root}; "
              f"{describe(registration_from_record(record), changed=True)}")


if __name__ == "__main__":
    main()
