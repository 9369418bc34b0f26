"""One retraining cycle: refresh the inputs, `dvc repro`, say what happened to the champion.

Usage: python -m pipeline.retrain [--params params.yaml] [--no-wait] [--log logs/retrain.log]
                                  [--debug]
(`pipeline.retrain` calls this module, `pipeline.commands.retrain`.)

Meant to be started by cron, a systemd timer or CI at any time, so a cycle is:
- exclusive: it holds an flock on `logs/retrain.lock`; a second cycle waits for the first one,
  or with --no-wait exits at once with 75 (EX_TEMPFAIL, "try again later");
- idempotent: DVC reruns only the stages whose inputs changed, so a cycle with nothing new ends
  with "nothing changed";
- harmless when it fails: retrain itself never talks to the model registry. Only the `register`
  stage does, and DVC runs it only after train and evaluate succeeded.

Steps, each a subprocess in the repository root (the directory holding dvc.yaml, found from the
--params file) with the virtualenv's python and dvc first on PATH:
1. `python -m pipeline.commands.params`: compose conf/ into params.yaml (rewritten only if it
   differs), under the lock so that two cycles never write it at once. Skipped, with a log
   line, in a repository without conf/, whose params.yaml is then used as it is;
2. `dvc pull data.dvc`, only when a DVC remote is configured ($DVC_REMOTE_URL, see
   `pipeline.support.workspace.configure_env_remote`, or the repository's): labelled images
   pushed by others.
   Images put in data/extra by hand and never committed make it fail rather than be deleted;
   `python -m pipeline.add_data` commits them;
3. `python -m pipeline.stages.download`: re-verify the raw archives, refetch missing or corrupt
   ones;
4. `dvc repro`: the whole pipeline, with whatever data/extra holds now;
5. only when DVC found everything up to date but the MLflow store in use lacks the run this
   checkout recorded (the store was switched: `pipeline.support.store_records`), the stages that
   record it are redone in that store, as `make train` does.
The download stage itself falls back on ../shared/fashion-mnist when FMNIST_MIRROR is unset, so
cycles that cron or systemd start without make find the local archives too.
The outcome comes from models/registration.json, which the `register` stage writes: unchanged
bytes mean that no new candidate was evaluated.

Exit codes: 0 promoted, kept or nothing changed; 1 a failure (the failed step and the log file
are named; --debug or FMNIST_DEBUG=1 shows its traceback too); 75 another cycle holds the lock
and --no-wait was given; 130 interrupted.

Log: each cycle appends timestamped lines (start, each step, the outcome or the failure) to the
--log file (a `logging` FileHandler). The steps' own output goes to stdout/stderr. When stdout
is the log file itself (cron runs `... >> logs/retrain.log 2>&1`), each line is written there
once, timestamped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipeline.support import config, errors, store, store_records
from pipeline.support.locks import LockBusy, exclusive_lock, timestamp
from pipeline.support.outputs import Outputs
from pipeline.support.registration_file import (
    Outcome,
    RegistrationFileError,
    describe,
    parse_registration,
)
from pipeline.support.workspace import (
    CONFIG_DIR,
    EXTRA_DVC_FILE,
    RETRAIN_LOG,
    CommandError,
    child_env,
    configure_env_remote,
    dvc_remotes,
    find_repo_root,
    venv_tool,
)

EX_TEMPFAIL = 75
LOCK_FILE = Path("logs") / "retrain.lock"
REGISTRATION_FILE = Outputs().registration
DVC_LOCK_FILE = "dvc.lock"


def cycle_lock(
    path: str | Path, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> AbstractContextManager[None]:
    """The cycle's lock: a second cycle waits for the first, or raises LockBusy without `wait`."""
    return exclusive_lock(path, wait=wait, on_wait=on_wait)


# --- What the cycle did ---------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The files that tell whether a repro changed anything (None: absent)."""

    dvc_lock: bytes | None
    registration: bytes | None


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def take_snapshot(root: Path) -> Snapshot:
    return Snapshot(_read_or_none(root / DVC_LOCK_FILE), _read_or_none(root / REGISTRATION_FILE))


def outcome_of(root: Path, before: Snapshot, after: Snapshot) -> Outcome:
    """Compare the registration before and after the repro; CommandError if it is unusable."""
    path = root / REGISTRATION_FILE
    if after.registration is None and after.dvc_lock == before.dvc_lock:
        # No stage ran, in a checkout whose outputs came from `make pull` (CI): the record of
        # a registration is not committed (it belongs to one store), so there is none here.
        return Outcome("unchanged", "nothing changed (no stage ran; the outputs came from "
                                    "`make pull`)")
    if after.registration is None:
        raise CommandError("read outcome", f"dvc repro succeeded but {path} does not exist; "
                                           "is the register stage in dvc.yaml?")
    try:
        registration = parse_registration(after.registration)
        return describe(registration, changed=after.registration != before.registration)
    except RegistrationFileError as exc:
        raise CommandError("read outcome", f"{path}: {exc}") from None


# --- The cycle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return shlex.join(self.argv)


def plan(params: Path, pull_extra: bool, compose: bool = True) -> list[Step]:
    """The commands of a cycle, in order; run from the repository root."""
    steps = []
    if compose:  # first: every later step reads params.yaml
        steps.append(Step("params", (sys.executable, "-m", "pipeline.commands.params")))
    if pull_extra:
        steps.append(Step("dvc pull", (venv_tool("dvc"), "pull", EXTRA_DVC_FILE)))
    steps.append(Step("download", (sys.executable, "-m", "pipeline.stages.download",
                                   "--params", str(params))))
    steps.append(Step("dvc repro", (venv_tool("dvc"), "repro", "--force-downstream")))
    return steps


Runner = Callable[..., subprocess.CompletedProcess]


def _read_parameters(params: Path) -> config.Config:
    """The parameters, once a tracking server that is down has failed the cycle in seconds,
    before any step works."""
    try:
        cfg = config.load(params)
    except config.ConfigError as exc:
        raise CommandError("read parameters", str(exc)) from None
    try:
        store.check_server(store.tracking_uri(cfg.mlflow))
    except store.StoreUnavailable as exc:
        raise CommandError("check tracking server", str(exc)) from None
    return cfg


def run_cycle(root: Path, params: Path, log: CycleLog, run: Runner = subprocess.run) -> Outcome:
    """One cycle under the caller's lock: the steps of `plan`, then the outcome.

    Raises CommandError naming the first step that failed; later steps do not run.
    """
    root, params = Path(root), Path(params).absolute()
    env = child_env()
    compose = (root / CONFIG_DIR).is_dir()
    if not compose:
        log.info(f"no {CONFIG_DIR}/ in {root}: using {params.name} as it is")
    configure_env_remote(root, env)  # $DVC_REMOTE_URL, as `make pull` and `make push` do
    remotes = dvc_remotes(root, env)
    log.info(f"DVC remotes: {', '.join(remotes)}" if remotes
             else "no DVC remote configured: using data/extra as it is")
    before = take_snapshot(root)
    cfg = None
    for step in plan(params, pull_extra=bool(remotes), compose=compose):
        if cfg is None and step.name != "params":  # once composed, before anything reads them
            cfg = _read_parameters(params)
        if step.name == "dvc repro":
            # A fresh clone has no data/extra when no image was ever added; split depends on it.
            (root / cfg.data.extra_dir).mkdir(parents=True, exist_ok=True)
        _run_step(step, root, env, log, run)
    after = take_snapshot(root)
    if after == before and (missing := _missing_in_store(root, cfg.mlflow)) is not None:
        # DVC found everything up to date, but the store was switched since this checkout
        # recorded its run: record it in this store, as `make train` does.
        log.info(f"{missing.reason}: recording it in this store")
        _run_step(Step("record in store", (venv_tool("dvc"), *missing.dvc_args)),
                  root, env, log, run)
        after = take_snapshot(root)
    if after.dvc_lock != before.dvc_lock and after.registration == before.registration:
        log.info("dvc.lock changed but the registration did not: no new candidate")
    return outcome_of(root, before, after)


def _run_step(step: Step, root: Path, env: dict[str, str], log: CycleLog, run: Runner) -> None:
    log.info(f"step {step.name}: {step}")
    started = time.monotonic()
    try:
        code = run(list(step.argv), cwd=root, env=env).returncode
    except OSError as exc:
        raise CommandError(step.name, f"cannot run {step.argv[0]}: {exc}") from None
    if code != 0:
        raise CommandError(step.name, f"exited with code {code} (its output is above)")
    log.info(f"step {step.name}: done in {time.monotonic() - started:.1f} s")


def _missing_in_store(root: Path,
                      cfg: config.MlflowConfig) -> store_records.Missing | None:
    """What the current MLflow store lacks of the run this checkout recorded; None if it holds
    it all, or if the checkout recorded no run (its outputs came from `make pull`: the run is in
    the store of whoever pushed them)."""
    out = Outputs(root)
    if not out.run.is_file():
        return None
    try:
        # From the root, as the steps run: a relative store (sqlite:///mlflow.db) is the root's.
        with contextlib.chdir(root):
            records, uri = store_records.open_reader(cfg)
            return store_records.check(cfg, out, records, uri)
    except errors.expected() as exc:
        raise CommandError("check the store's records", errors.explain(exc)) from None


# --- Reporting ------------------------------------------------------------------------------


def _is_same_file(stream: TextIO, path: Path) -> bool:
    try:
        here, there = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _console(record: logging.LogRecord) -> TextIO:
    """Looked up at each line: whoever runs the cycle may have replaced sys.stdout."""
    return sys.stderr if record.levelno >= logging.ERROR else sys.stdout


class _Stamped(logging.Formatter):
    """`<local time, ISO 8601 to the second> [pid N] <message>`: the log file's lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s [pid %(process)d] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return timestamp(record.created)


class _Console(logging.Handler):
    """The line people read (`shown`) on stdout, errors on stderr; when that stream is the log
    file itself (cron: `>> logs/retrain.log 2>&1`), the timestamped line instead, written once."""

    def __init__(self, path: Path | None):
        super().__init__()
        self.path, self.stamped = path, _Stamped()

    def emit(self, record: logging.LogRecord) -> None:
        stream = _console(record)
        if self.path is not None and _is_same_file(stream, self.path):
            print(self.stamped.format(record), file=stream, flush=True)
        else:
            print(record.shown, file=stream, flush=True)


class CycleLog:
    """Lines for whoever watches (stdout, errors on stderr) and, timestamped, for the log file:
    a logger with a console handler and a FileHandler appending to the log file."""

    def __init__(self, path: Path | None):
        self.path = path
        self.logger = logging.Logger("pipeline.retrain")  # its own: no global logging state
        self.logger.addHandler(_Console(path))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(path, encoding="utf-8")
            to_file.setFormatter(_Stamped())
            # Written by the console handler when the console is this file.
            to_file.addFilter(lambda record: not _is_same_file(_console(record), path))
            self.logger.addHandler(to_file)

    def info(self, message: str) -> None:
        self.logger.info(message, extra={"shown": f"retrain: {message}"})

    def error(self, message: str) -> None:
        self.logger.error(message, extra={"shown": f"retrain: error: {message}"})

    def outcome(self, outcome: Outcome) -> None:
        self.logger.info(f"outcome: {outcome.line}", extra={"shown": outcome.line})

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.retrain",
        description="Run one retraining cycle: refresh inputs, dvc repro, report the outcome.",
        epilog="Exit codes: 0 promoted/kept/nothing changed, 1 failure, "
               f"{EX_TEMPFAIL} another cycle is running (--no-wait), 130 interrupted.",
    )
    parser.add_argument("--params", default=config.PARAMS_FILE,
                        help="composed parameter file; its directory (or a parent) holds dvc.yaml")
    parser.add_argument("--no-wait", action="store_true",
                        help=f"exit with {EX_TEMPFAIL} at once if another cycle is running")
    parser.add_argument("--log", type=Path, default=None,
                        help=f"file to append the cycle's lines to (default: <repo>/{RETRAIN_LOG})")
    parser.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = parser.parse_args(argv)

    params = Path(args.params).absolute()
    try:
        root = find_repo_root(params.parent)
    except CommandError as exc:
        errors.report("retrain", exc, args.debug, message=str(exc))
        return 1
    log_path = (args.log.absolute() if args.log is not None else root / RETRAIN_LOG)
    try:
        log = CycleLog(log_path)
    except OSError as exc:
        errors.report("retrain", exc, args.debug,
                      message=f"cannot write the log file {log_path}: {exc}")
        return 1

    try:
        return _run(root, params, args.no_wait, log, log_path, args.debug)
    finally:
        log.close()


def _run(root: Path, params: Path, no_wait: bool, log: CycleLog, log_path: Path,
         debug: bool) -> int:
    def announce_wait(holder: str) -> None:
        log.info(f"another cycle is running ({holder}); waiting for it to finish")

    try:
        with cycle_lock(root / LOCK_FILE, wait=not no_wait, on_wait=announce_wait):
            log.info(f"start: cycle in {root} with {params.name}")
            outcome = run_cycle(root, params, log)
    except LockBusy as exc:
        errors.show_traceback(exc, debug)
        log.error(f"another cycle is running ({exc}); not waiting (--no-wait)")
        return EX_TEMPFAIL
    except CommandError as exc:
        errors.show_traceback(exc, debug)
        champion = ("The champion is untouched unless the register stage itself failed"
                    if exc.step == "dvc repro" else "The champion is untouched")
        log.error(f"step {exc.step!r} failed: {exc.message}. {champion}. Log: {log_path}")
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; the champion is untouched unless the register stage had started")
        return 130
    log.outcome(outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
