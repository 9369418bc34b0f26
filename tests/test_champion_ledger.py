"""The champion ledger, `rollback` and `champion-history` on a real sqlite store and registry,
each command in a process of its own as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import test_register
from tests.synthetic import REPO_ROOT
from tests.test_register import champion_version, evaluated_run, params_for_model, register

store, name = test_register.store, test_register.name  # the fixtures: a store, a model name


def command(module: str, params: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # MLFLOW_TRACKING_URI: the test's store
    return subprocess.run([sys.executable, "-m", f"pipeline.commands.{module}", "--params",
                           str(params), *args], cwd=params.parent, env=env, capture_output=True,
                          text=True, timeout=120)


def ledger(name: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from pipeline.support import champion_ledger

    client = MlflowClient()
    experiment = client.get_experiment_by_name("fashion-mnist").experiment_id
    return champion_ledger.read(client, experiment, name)


@pytest.mark.slow
def test_rollback_then_history_shows_both_moves(name: str, tmp_path: Path) -> None:
    for accuracy, folder in ((0.80, "a"), (0.85, "b"), (0.90, "c")):
        assert register(name, *evaluated_run(accuracy, loadable=True), tmp_path / folder)[
            "promoted"]
    params = params_for_model(tmp_path / "params.yaml", name)

    back = command("rollback", params, "--reason", "v3 misbehaves in production")
    assert back.returncode == 0, back.stderr
    assert back.stdout.startswith(f"rollback: champion of {name} moved from version 3 to "
                                  "version 2 (v3 misbehaves in production)")
    assert champion_version(name) == "2"
    # Twice goes two promotions back, not back and forth.
    again = command("rollback", params)
    assert again.returncode == 0, again.stderr
    assert champion_version(name) == "1"
    none_left = command("rollback", params)
    assert none_left.returncode == 1 and champion_version(name) == "1"
    assert none_left.stderr == (f"rollback: error: the champion ledger of {name} names no "
                                "champion before version 1: name one (`make rollback "
                                "VERSION=N`)\n")
    named = command("rollback", params, "--version", "3", "--reason", "fixed upstream")
    assert named.returncode == 0, named.stderr
    assert champion_version(name) == "3"

    history = command("champion_history", params)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert lines[0].split()[:4] == ["time", "action", "from", "to"]
    moves = [line.split()[2:5] for line in lines[1:]]
    assert moves == [["promotion", "-", "v1"], ["promotion", "v1", "v2"],
                     ["promotion", "v2", "v3"], ["rollback", "v3", "v2"],
                     ["rollback", "v2", "v1"], ["rollback", "v1", "v3"]]
    assert "v3 misbehaves in production" in lines[4] and "McNemar n01=500 n10=0" in lines[3]
    assert "0.9000 -> 0.8500" in lines[4]
    records = [json.loads(line) for line in
               command("champion_history", params, "--json").stdout.splitlines()]
    assert records == ledger(name)
    assert records[3]["reason"] == "v3 misbehaves in production"
    assert records[3]["user"] and records[3]["host"] and records[3]["time"].endswith("Z")
    assert records[-1]["reason"] == "fixed upstream"


def test_a_target_that_fails_the_model_check_is_refused_before_the_alias_moves(
        name: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    register(name, *evaluated_run(0.80, loadable=True), tmp_path / "a")
    register(name, *evaluated_run(0.85, loadable=True), tmp_path / "b")
    def model_file(version: str) -> Path:
        source = MlflowClient().get_model_version(name, version).source
        logged = mlflow.get_logged_model(source.removeprefix("models:/"))
        return Path(logged.artifact_location.removeprefix("file://")) / "model.skops"

    # Version 1's model file in the store is replaced by another valid model (version 2's).
    model_file("1").write_bytes(model_file("2").read_bytes())
    params = params_for_model(tmp_path / "params.yaml", name)
    refused = command("rollback", params)
    assert refused.returncode == 1 and champion_version(name) == "2"
    assert refused.stderr.startswith("rollback: error: ")
    assert "(model_sha256) when it was registered: the file was replaced" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    # A file that is no model at all is refused the same way, before anything loads it.
    model_file("1").write_bytes(b"not a model")
    refused = command("rollback", params)
    assert refused.returncode == 1 and champion_version(name) == "2"
    assert "the file was replaced or damaged" in refused.stderr, refused.stderr
    assert len(ledger(name)) == 2  # the two promotions; nothing for the refused move
    missing = command("rollback", params, "--version", "7")
    assert missing.returncode == 1
    assert missing.stderr == f"rollback: error: registered model {name} has no version '7'\n"


def test_a_rollback_to_a_version_without_a_digest_says_so_once(
        name: str, tmp_path: Path) -> None:
    """A version registered before digests were recorded can still become champion again; the
    notice that its bytes cannot be verified is printed once, not once per check."""
    from mlflow.tracking import MlflowClient

    register(name, *evaluated_run(0.80, loadable=True), tmp_path / "a")
    register(name, *evaluated_run(0.85, loadable=True), tmp_path / "b")
    MlflowClient().delete_model_version_tag(name, "1", "model_sha256")
    params = params_for_model(tmp_path / "params.yaml", name)

    back = command("rollback", params)

    assert back.returncode == 0, back.stderr
    assert champion_version(name) == "1"
    assert back.stderr.count("has no model_sha256 tag") == 1, back.stderr


def test_history_of_a_model_never_promoted_says_so(name: str, tmp_path: Path) -> None:
    params = params_for_model(tmp_path / "params.yaml", name)
    shown = command("champion_history", params)
    assert shown.returncode == 0 and shown.stdout == ""
    assert shown.stderr == (f"champion-history: no move of `champion` recorded for {name} "
                            "yet\n")


@pytest.mark.parametrize("version", ["two", "-1"])
def test_a_version_that_is_not_a_number_is_refused(tmp_path: Path, version: str) -> None:
    params = params_for_model(tmp_path / "params.yaml", "any")
    refused = command("rollback", params, "--version", version)
    assert refused.returncode == 2
    assert refused.stderr == (f"rollback: error: VERSION={version!r} is invalid: expected a "
                              "version number\n")


def test_the_default_rollback_target_follows_promotions_then_the_move_that_made_the_champion(
) -> None:
    from pipeline.support.champion_ledger import PROMOTION, previous_champion

    def move(action: str, before: str | None, after: str) -> dict[str, str | None]:
        return {"action": action, "from_version": before, "to_version": after}

    promoted = [move(PROMOTION, None, "1"), move(PROMOTION, "1", "2"), move(PROMOTION, "2", "3")]
    assert previous_champion(promoted, "3") == "2"
    # Rolled back 3 -> 2: the next default goes on to 1, not back to 3.
    assert previous_champion([*promoted, move("rollback", "3", "2")], "2") == "1"
    # Version 4 was never promoted; `rollback --version 4` made it champion: back to 1.
    pinned = [*promoted[:1], move("rollback", "1", "4")]
    assert previous_champion(pinned, "4") == "1"
    assert previous_champion(promoted[:1], "1") is None
