"""Hyperparameter search with Optuna: parallel workers, pruning, one MLflow parent run.

Usage: python -m pipeline.tune [--trials 12] [--workers 2] [--timeout SECONDS] [--study NAME]
                               [--seed 0] [--debug] [HYDRA_OVERRIDE ...]

conf/ is composed with `+search=softmax` (conf/search/) and the overrides, and everything is
checked before a worker starts. The study lives in $OPTUNA_STORAGE (a database URL: the team
stack's PostgreSQL) or else in `optuna.db` at the project root, so a second invocation with the
same study name resumes it, on this machine or another. Each worker process loads the data once
and runs trials until the invocation's budget is spent; every trial is a child MLflow run of the
invocation's parent run, with its parameters, learning curves, validation metrics and validation
confusion matrix, and no model. Selection is on validation only: at the end the study's best
trial is retrained through the train stage, evaluated once on test and offered to the champion
rule by the register stage (`pipeline.stage_chain`, as the direct Hydra run does), so one
invocation adds at most one model version.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.files import atomic_write_text
from pipeline.support import composition, config, errors, estimators, search, store, tracking
from pipeline.support.outputs import Outputs
from pipeline.support.workspace import project_root

STORAGE_ENV = "OPTUNA_STORAGE"
STORAGE_FILE = "optuna.db"
DEFAULT_SEARCH = "softmax"
INTERRUPT_GRACE_SECONDS = 30.0  # for the workers to mark their trials FAIL after a Ctrl-C
# A worker that stops sending heartbeats for GRACE seconds is dead: its trial becomes FAIL.
HEARTBEAT_SECONDS, GRACE_SECONDS = 2, 10


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a worker needs, picklable: it crosses into a spawned process."""

    cfg: config.Config
    space: search.SearchSpace
    study: str
    storage: str
    parent_run_id: str
    seed: int
    deadline: float | None
    trials_before: int  # the study's size when this invocation began (for worker_seed)


def storage_url() -> str:
    """$OPTUNA_STORAGE (team mode) or the project's embedded sqlite study store."""
    return os.environ.get(STORAGE_ENV) or f"sqlite:///{project_root() / STORAGE_FILE}"


def compose(overrides: Sequence[str]) -> tuple[config.Config, search.SearchSpace]:
    """conf/ + the search group + overrides, checked: ConfigError names the bad key."""
    chosen = any(o.lstrip("+~").startswith("search=") for o in overrides)
    extra = [] if chosen else [f"+search={DEFAULT_SEARCH}"]
    try:
        raw = yaml.safe_load(composition.compose(project_root(), [*extra, *overrides]))
    except Exception as exc:  # Hydra raises several types for a bad override or group
        raise config.ConfigError(f"cannot compose conf/ with {list(overrides)}: {exc}") from None
    raw_search = raw.pop("search", None)
    cfg = config.validate(raw)
    estimators.check_params(cfg.model)
    return cfg, search.parse(raw_search, cfg.model)


def quiet_optuna() -> None:
    """Optuna's INFO lines and its experimental-feature warnings (heartbeats, plots) off."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # matplotlib, when every trial of a plot has the same value (a short or pruned study)
    warnings.filterwarnings("ignore", message="Attempting to set identical low and high ylims")


def open_storage(url: str) -> Any:
    """An RDB storage with heartbeats: a killed worker's trial becomes FAIL and is retried once."""
    import optuna

    quiet_optuna()
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=_on_stale_trial)


def _on_stale_trial(study: Any, trial: Any) -> None:
    """A trial whose worker died: retry it, and mark its MLflow run FAILED with the reason."""
    from mlflow.tracking import MlflowClient
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        client = MlflowClient()
        client.set_tag(run_id, "failure_reason", "its worker stopped (no heartbeat for "
                                                 f"{GRACE_SECONDS} s)")
        client.set_tag(run_id, "optuna_state", "FAIL")
        client.set_terminated(run_id, "FAILED")


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def worker_seed(seed: int | None, worker: int, n_trials: int,
                shared_by: str | None = None) -> int | None:
    """The sampler seed of one worker: `--seed` mixed with the worker and the study's size.

    On the embedded store a seeded invocation is reproducible. A study in a shared database
    (`$OPTUNA_STORAGE`) may be joined at the same moment, with the same --seed, from another
    machine: there `shared_by`, the invocation's unique parent run id, is mixed in too, so no
    two invocations draw the same sequence of points.
    """
    if seed is None:
        return None
    if shared_by is None:
        return seed + 1000 * worker + n_trials
    key = f"{seed}:{worker}:{n_trials}:{shared_by}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def load_study(plan: Plan, sampler_seed: int | None = None) -> Any:
    import optuna

    sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    return optuna.load_study(study_name=plan.study, storage=open_storage(plan.storage),
                             sampler=sampler, pruner=_pruner(plan.space.pruner))


# ---------------------------------------------------------------------------- one trial


class Objective:
    """The Optuna objective of one worker: its data, loaded once, and one trial per call."""

    def __init__(self, plan: Plan):
        from pipeline.core.split import load_split

        self.plan = plan
        self.train = load_split(plan.cfg.data.split_dir, "train")
        self.val = load_split(plan.cfg.data.split_dir, "val")

    def __call__(self, trial: Any) -> float:
        import mlflow
        import optuna

        from pipeline.core.metrics import evaluate_predictions

        plan = self.plan
        model = {**plan.cfg.model, **search.suggest(trial, plan.space)}
        spec = estimators.check_params(model)  # the typed check, before anything trains
        run = mlflow.start_run(run_name=f"trial {trial.number}: {spec.run_name}",
                               parent_run_id=plan.parent_run_id,
                               tags={"optuna_study": plan.study, "optuna_trial": str(trial.number),
                                     "model": spec.kind, "source": "tune",
                                     **tracking.process_tags()})
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        trial.set_user_attr("parent_run_id", plan.parent_run_id)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        status = "FAILED"
        curves: list[Any] = []
        try:
            mlflow.log_params(tracking.run_params(plan.cfg, spec.all_params, spec.target))

            def on_epoch(record: dict[str, Any]) -> None:
                epoch = record["epoch"]
                curves.extend(tracking.epoch_metrics(record))  # logged after the fit
                if _stop_requested:  # Ctrl-C, honoured here where stopping is clean
                    raise KeyboardInterrupt
                trial.report(record[plan.space.epoch_key], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(
                        f"pruned after epoch {epoch}: {plan.space.epoch_key}="
                        f"{record[plan.space.epoch_key]:.4f} lags the other trials")

            started = time.perf_counter()
            estimator = estimators.build(spec)
            estimators.fit(estimator, *self.train, *self.val, on_epoch)
            fit_seconds = time.perf_counter() - started
            X_val, y_val = self.val
            evaluation = evaluate_predictions(y_val, estimator.predict_proba(X_val),
                                              list(plan.cfg.data.class_names))
            metrics = {f"val_{key}": value for key, value in evaluation.scalars.items()}
            mlflow.log_metrics({**metrics, "train_seconds": fit_seconds})
            mlflow.log_text(evaluation.confusion_table.to_csv(), "evaluation/confusion_val.csv")
            trial.set_user_attr("train_seconds", fit_seconds)
            mlflow.set_tag("optuna_state", "COMPLETE")
            status = "FINISHED"
            return metrics[plan.space.objective]
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned_reason", str(exc))
            # Pruning is the search working as meant, not a crash: FINISHED (no red cross in
            # the UI), and the tag `pruned=true` tells the trial apart from a complete one.
            mlflow.set_tags({"optuna_state": "PRUNED", "pruned": "true",
                             "pruned_reason": str(exc)})
            status = "FINISHED"
            raise
        except Exception as exc:
            reason = errors.explain(exc)
            trial.set_user_attr("fail_reason", reason)
            mlflow.set_tags({"optuna_state": "FAIL", "failure_reason": reason})
            raise
        finally:
            if curves:  # a pruned or failed trial keeps the curves of its epochs too
                mlflow.MlflowClient().log_batch(run.info.run_id, metrics=curves)
            mlflow.end_run(status)


_stop_requested = False  # set by Ctrl-C in a worker (`work`)


def _request_stop(signum: int, frame: Any) -> None:
    global _stop_requested
    _stop_requested = True


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    """Optuna logs a trial that Ctrl-C stopped twice, with its traceback and then as "failed with
    value None": the parent says it in one line."""
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        return False
    return not (_stop_requested and record.getMessage().endswith("failed with value None."))


def work(plan: Plan, worker: int, tickets: Any) -> None:
    """A worker process: run trials while the invocation's budget (`tickets`) lasts.

    Started with SIGINT ignored (`run_workers`), so a Ctrl-C while it imports is no traceback.
    From here Ctrl-C only sets a flag: the trial stops at its next epoch (Optuna and MLflow mark
    it FAIL(ED)) and the worker at its next trial, in silence, never inside a library's code;
    the parent reports the interruption once.
    """
    signal.signal(signal.SIGINT, _request_stop)
    try:
        from pipeline.core.estimator import TrainingDivergedError

        tracking.fail_runs_on_sigterm()
        logging.getLogger("optuna.study._optimize").addFilter(_not_an_interrupt)
        store.connect(plan.cfg.mlflow)
        objective = Objective(plan)
        shared = plan.parent_run_id if os.environ.get(STORAGE_ENV) else None
        study = load_study(plan, worker_seed(plan.seed, worker, plan.trials_before, shared))
        while (plan.deadline is None or time.time() < plan.deadline) and not _stop_requested:
            with tickets.get_lock():
                if tickets.value <= 0:
                    return
                tickets.value -= 1
            study.optimize(objective, n_trials=1,
                           catch=(TrainingDivergedError, config.ConfigError),
                           callbacks=[lambda _, trial: _report(worker, trial, plan.space)])
    except KeyboardInterrupt:
        return


def _report(worker: int, trial: Any, space: search.SearchSpace) -> None:
    value = f" {space.objective}={trial.value:.4f}" if trial.state.name == "COMPLETE" else ""
    reason = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("pruned_reason")
    print(f"tune: worker {worker}: trial {trial.number} {trial.state.name}{value}"
          + (f" ({reason})" if reason else ""), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the invocation


def create_study(name: str, url: str, space: search.SearchSpace) -> Any:
    """Create the study once, before any worker starts (optuna#1092), or load it to resume."""
    import optuna

    study = optuna.create_study(study_name=name, storage=open_storage(url),
                                direction=space.direction, load_if_exists=True)
    if study.direction.name.lower() != space.direction:
        raise config.ConfigError(
            f"study {name!r} in {store.redact_url(url)} was created to "
            f"{study.direction.name.lower()}, but search.objective={space.objective!r} needs "
            f"{space.direction}; choose another --study name")
    study.set_user_attr("objective", space.objective)
    return study


def run_workers(plan: Plan, n_trials: int, n_workers: int) -> list[int]:
    """Start the workers, wait for them; their exit codes (a killed one is negative)."""
    context = multiprocessing.get_context("spawn")
    tickets = context.Value("i", n_trials)
    processes = [context.Process(target=work, args=(plan, worker, tickets),
                                 name=f"tune-worker-{worker}") for worker in range(n_workers)]
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited: quiet while importing
    try:
        for process in processes:
            process.start()
    finally:
        signal.signal(signal.SIGINT, interrupt)
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:  # the workers had it too: let them close their trials, then go
        deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():  # still importing (SIGINT ignored) or stuck: SIGTERM
                process.terminate()
                process.join()
        raise
    return [process.exitcode for process in processes]


def fail_abandoned_trials(plan: Plan) -> None:
    """Trials of dead workers that nobody noticed: wait out the grace period, then FAIL them."""
    import optuna

    study = load_study(plan)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if any(t.user_attrs.get("parent_run_id") == plan.parent_run_id for t in running):
        time.sleep(GRACE_SECONDS + HEARTBEAT_SECONDS)
        optuna.storages.fail_stale_trials(study)


def log_study(client: Any, run_id: str, study: Any, space: search.SearchSpace,
              folder: Path) -> None:
    """Optuna's matplotlib figures of the whole study, attached to the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as plots

    from pipeline.support import figures

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    drawings = {"optimization_history.png": plots.plot_optimization_history,
                "parallel_coordinate.png": plots.plot_parallel_coordinate}
    if len(complete) >= 2:
        drawings["param_importances.png"] = plots.plot_param_importances
    for name, draw in drawings.items():
        axes = draw(study)
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(10, 6)
        figures.save(figure, folder / name)
        figures.close(figure)
        client.log_artifact(run_id, str(folder / name), artifact_path="optuna")


def best_model_yaml(model: dict[str, Any], study: str, trial: Any, objective: str) -> str:
    header = (f"# Best trial of Optuna study {study!r}: trial {trial.number}, {objective}="
              f"{trial.value:.4f} (validation).\n# Copy into conf/model/ (for example as "
              "conf/model/tuned.yaml, then `model=tuned`).\n")
    return header + yaml.safe_dump(model, sort_keys=False)


def describe_study(searched: str, best: Any, objective: str, run: dict[str, Any],
                   registration: dict[str, Any]) -> str:
    """The parent run's description: the search, its best trial, what became of it."""
    params = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in best.params.items())
    candidate = registration["candidate"]["version"]
    decision = ("promoted to `champion`" if registration["promoted"]
                else "not promoted (alias `challenger`)")
    return (f"{searched}\n\nBest: trial {best.number}, {objective} {best.value:.4f} ({params})."
            f"\n\nRetrained as run **{run['run_name']}** ({run['run_id']}) and registered as "
            f"{registration.get('registered_model', 'the model')} version {candidate}, "
            f"{decision} on {registration['metric']}: {registration['reason']}.")


def tune(cfg: config.Config, space: search.SearchSpace, n_trials: int, n_workers: int,
         timeout: float | None, study_name: str, seed: int | None) -> int:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.stage_chain import run_chain
    from pipeline.support.summary_table import format_run_summary

    url = storage_url()
    study = create_study(study_name, url, space)
    before = len(study.trials)
    store.connect(cfg.mlflow)
    tracking.fail_killed_runs(cfg.mlflow.experiment)
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    commit, dirty = tracking.git_commit()
    parent = client.create_run(
        experiment.experiment_id, run_name=f"tune-{study_name}-from-trial-{before}",
        tags={"optuna_study": study_name, "optuna_storage": store.redact_url(url), "source": "tune",
              "git_commit": commit, "git_dirty": str(dirty).lower(), "model": "study"})
    parent_id = parent.info.run_id
    client.set_tag(parent_id, tracking.NOTE, f"Optuna study `{study_name}`: {n_trials} trials "
                   f"on {n_workers} workers, running.")
    client.log_dict(parent_id, {"objective": space.objective, "pruner": space.pruner,
                                "space": [dataclasses.asdict(d) for d in space.dimensions]},
                    "optuna/search_space.yaml")
    for key, value in {"trials": n_trials, "workers": n_workers, "timeout": timeout,
                       "seed": seed}.items():
        client.log_param(parent_id, key, value)
    deadline = None if timeout is None else time.time() + timeout
    plan = Plan(cfg, space, study_name, url, parent_id, seed, deadline, before)
    print(f"tune: study {study_name!r} in {store.redact_url(url)} ({before} trials so far); "
          f"{n_trials} trials on {n_workers} workers; MLflow parent run {parent_id}",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        exit_codes = run_workers(plan, n_trials, n_workers)
    except KeyboardInterrupt:
        client.set_terminated(parent_id, "KILLED")
        print("tune: interrupted; the study is kept: run the same command to resume it",
              file=sys.stderr)
        return 130
    for worker, code in enumerate(exit_codes):
        if code:
            print(f"tune: worker {worker} exited with {code}; its trial is marked FAIL",
                  file=sys.stderr)
    fail_abandoned_trials(plan)
    seconds = time.perf_counter() - started

    study = load_study(plan)
    mine = [t for t in study.trials if t.user_attrs.get("parent_run_id") == parent_id]
    counts = {state: sum(t.state.name == state for t in mine)
              for state in ("COMPLETE", "PRUNED", "FAIL")}
    client.log_metric(parent_id, "tune_seconds", seconds)
    for state, count in counts.items():
        client.log_metric(parent_id, f"trials_{state.lower()}", count)
    print(f"tune: {len(mine)} trials in {seconds:.1f} s: {counts['COMPLETE']} complete, "
          f"{counts['PRUNED']} pruned, {counts['FAIL']} failed", file=sys.stderr)
    searched = (f"Optuna study `{study_name}` ({store.redact_url(url)}): {len(mine)} trials in "
                f"{seconds:.0f} s on {n_workers} workers ({counts['COMPLETE']} complete, "
                f"{counts['PRUNED']} pruned, {counts['FAIL']} failed), objective "
                f"{space.objective} on validation.")
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        client.set_tag(parent_id, tracking.NOTE, f"{searched}\n\nNo trial completed: nothing "
                                                 "was registered.")
        client.set_terminated(parent_id, "FAILED")
        print(f"tune: error: no trial of study {study_name!r} completed; nothing to register",
              file=sys.stderr)
        return 1

    best = study.best_trial
    best_model = {**cfg.model, **best.params}
    folder = project_root() / "outputs" / "tune" / study_name / datetime.now(UTC).strftime(
        "%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "best_model.yaml",
                      best_model_yaml(best_model, study_name, best, space.objective))
    client.log_artifact(parent_id, str(folder / "best_model.yaml"), artifact_path="optuna")
    log_study(client, parent_id, study, space, folder)
    client.log_metric(parent_id, f"best_{space.objective}", best.value)
    client.set_tag(parent_id, "best_trial", str(best.number))

    # Selected on validation; now trained again, scored once on test, offered to the champion.
    best_cfg = dataclasses.replace(cfg, model=best_model)
    out = Outputs(folder)
    try:
        chained = run_chain(best_cfg, out, "tune", tags={
            "optuna_study": study_name, "optuna_trial": str(best.number),
            "tune_parent_run_id": parent_id})
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    assert chained.registration is not None
    client.set_tag(parent_id, "best_run_id", chained.run["run_id"])
    client.set_tag(parent_id, "registered_version",
                   chained.registration["candidate"]["version"])
    client.set_tag(parent_id, tracking.NOTE, describe_study(
        searched, best, space.objective, chained.run, chained.registration))
    client.set_terminated(parent_id, "FINISHED")
    print(format_run_summary(out))
    print(f"tune: best trial {best.number} ({space.objective}={best.value:.4f}); its config: "
          f"{folder / 'best_model.yaml'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tune",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials in this invocation")
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--timeout", type=float, default=None,
                        help="start no trial after this many seconds")
    parser.add_argument("--study", default=None,
                        help="study name (default: <experiment>-<model kind>); reuse to resume")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the samplers (in a shared $OPTUNA_STORAGE, mixed with "
                             "the invocation so that machines never draw the same points)")
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. search.pruner=none")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.workers < 1 or (args.timeout is not None and args.timeout <= 0):
        parser.error("--trials and --workers must be >= 1, --timeout > 0")
    cores = os.cpu_count() or 1
    if args.workers > cores:
        print(f"tune: warning: --workers {args.workers} is more than the {cores} cores of this "
              "machine: the workers will share them, each trial running slower",
              file=sys.stderr, flush=True)
    tracking.fail_runs_on_sigterm()
    try:
        cfg, space = compose(args.overrides)
        study = args.study or f"{cfg.mlflow.experiment}-{estimators.check_params(cfg.model).kind}"
        return tune(cfg, space, args.trials, args.workers, args.timeout, study, args.seed)
    except errors.expected() as exc:
        errors.report("tune", exc, args.debug)
        return 1


if __name__ == "__main__":
    sys.exit(main())
