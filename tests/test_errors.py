"""One line for a user's own mistake, a traceback for a bug, and a traceback on request.

The stages and commands catch the project's errors (`PipelineError`), `OSError` and the store's
errors only (`pipeline.support.errors`); FMNIST_DEBUG=1 or `--debug` shows the traceback of
those too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.stages import train
from pipeline.support import errors
from tests.synthetic import REPO_ROOT

BAD_RATE_LINE = ("train: error: model.learning_rate=-1 is invalid: expected a float in the range "
                 "(0.0, inf)")


@pytest.fixture
def params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The committed params.yaml in an empty folder, its store a sqlite file there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return Path(shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml"))


def with_bad_learning_rate(params: Path) -> Path:
    text = params.read_text()
    assert "  learning_rate: " in text
    params.write_text("\n".join("  learning_rate: -1" if line.startswith("  learning_rate: ")
                                else line for line in text.splitlines()) + "\n")
    return params


def test_a_bug_in_a_stage_shows_its_traceback_not_one_line(
        params: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def buggy(*args: object, **kwargs: object) -> None:
        raise KeyError("x")

    monkeypatch.setattr(train, "train", buggy)
    with pytest.raises(KeyError, match="'x'"):  # Python prints its traceback
        train.main(["--params", str(params)])
    assert "error" not in capsys.readouterr().err


def test_a_config_error_is_one_line_without_debugging(
        params: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main(["--params", str(with_bad_learning_rate(params))]) == 1
    assert capsys.readouterr().err == BAD_RATE_LINE + "\n"


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debugging_shows_the_traceback_of_a_config_error_above_the_same_line(
        params: Path, how: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    argv = ["--params", str(with_bad_learning_rate(params))]
    if how == "env":
        monkeypatch.setenv(errors.DEBUG_ENV, "1")
    else:
        argv.append("--debug")
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert "pipeline.support.config.ConfigError: model.learning_rate=-1" in err
    assert err.endswith("\n" + BAD_RATE_LINE + "\n")


@pytest.mark.parametrize(("value", "on"), [("", False), ("0", False), ("1", True), ("yes", True)])
def test_fmnist_debug_values(value: str, on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(errors.DEBUG_ENV, value)
    assert errors.debugging() is on
    assert errors.debugging(True)


def test_only_the_projects_errors_and_oserror_are_expected() -> None:
    expected = errors.expected()
    assert issubclass(PipelineError, expected) and issubclass(FileNotFoundError, expected)
    for bug in (KeyError, ValueError, TypeError, AttributeError):
        assert not issubclass(bug, expected)


def test_every_error_class_of_the_project_is_a_pipeline_error() -> None:
    from pipeline.commands import add_data, schedule
    from pipeline.core import estimator, files, idx, labelled_images, split
    from pipeline.stages import download, register
    from pipeline.stages import split as split_stage
    from pipeline.support import config, locks, registration_file, store, tracking, workspace

    classes = [
        estimator.TrainingDivergedError, files.FileRefusedError, idx.IdxFormatError,
        labelled_images.ExtraDataError, labelled_images.ImageError, split.DatasetError,
        download.FetchError, register.RegistrationError, split_stage.StageError,
        config.ConfigError, locks.LockBusy, locks.LockUnavailable,
        registration_file.RegistrationFileError, store.StoreError, store.StoreUnavailable,
        tracking.RunFileError, workspace.CommandError, add_data.AddDataError,
        schedule.ScheduleError,
    ]
    assert all(issubclass(cls, PipelineError) for cls in classes)
    # The older bases stay, for callers that caught those.
    assert issubclass(config.ConfigError, ValueError)
    assert issubclass(store.StoreUnavailable, ConnectionError)


def test_the_direct_hydra_run_shows_a_traceback_with_fmnist_debug(tmp_path: Path) -> None:
    env = {**os.environ, errors.DEBUG_ENV: "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "pipeline.train", "model.learning_rate=-1",
               f"hydra.run.dir={tmp_path / 'run'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    line = ("train: error: conf/ with your overrides: model.learning_rate=-1 is invalid: "
            "expected a float in the range (0.0, inf)\n")
    debugged = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert debugged.returncode == 1
    assert "Traceback (most recent call last)" in debugged.stderr
    assert debugged.stderr.endswith(line)
    env.pop(errors.DEBUG_ENV)
    quiet = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (quiet.returncode, quiet.stderr) == (1, line)


def missing_params_commands() -> list[tuple[str, list[str]]]:
    """Commands that print their own one-line error for a parameter file that does not exist."""
    return [("validate", ["-m", "pipeline.stages.validate"]),
            ("download", ["-m", "pipeline.stages.download"]),
            ("split", ["-m", "pipeline.stages.split"]),
            ("team", ["-m", "pipeline.commands.preflight"])]


@pytest.mark.parametrize("name,argv", missing_params_commands(), ids=lambda v: str(v))
def test_fmnist_debug_shows_the_traceback_of_every_command_that_prints_one_line(
        tmp_path: Path, name: str, argv: list[str]) -> None:
    command = [sys.executable, *argv, "--params", str(tmp_path / "absent.yaml")]
    env = {key: value for key, value in os.environ.items() if key != errors.DEBUG_ENV}
    quiet = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert quiet.returncode == 1
    assert quiet.stderr.startswith(f"{name}: error: ") and "Traceback" not in quiet.stderr
    debugging = subprocess.run(command, cwd=tmp_path, env={**env, errors.DEBUG_ENV: "1"},
                               capture_output=True, text=True)
    assert debugging.returncode == 1
    assert debugging.stderr.startswith("Traceback (most recent call last):")
    assert quiet.stderr.splitlines()[0] in debugging.stderr.splitlines()
