"""Retraining cycles with the real pipeline: train, evaluate and register against a real registry.

tests/test_retrain.py checks single cycles, each from the same first cycle; here one repository
copy (synthetic data, sqlite MLflow store) goes through `python -m pipeline.retrain` as cron would
run it, and the tests share that copy: a first cycle, a cycle with nothing new, new images added
while three cycles start at once, and cycles that fail half-way. They run in any order: a test
puts back what it broke, and compares with what it found rather than with the first cycle.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.commands import retrain
from pipeline.support.champion_ledger import LEDGER_OF
from pipeline.support.store import CHALLENGER, CHAMPION
from pipeline.support.workspace import RETRAIN_LOG
from tests.repo_copy import MODEL_NAME, Repo, make_repo
from tests.synthetic import write_extra_folder

pytestmark = pytest.mark.slow

EXPERIMENT = "fashion-mnist"


@dataclass(frozen=True)
class Registry:
    """What a cycle may change: the runs, the versions and where the aliases point."""

    runs: dict[str, str]  # run id -> status
    versions: list[str]
    aliases: dict[str, str]

    @property
    def champion(self) -> str:
        return self.aliases[CHAMPION]


def registry(repo: Repo) -> Registry:
    client = repo.client()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = {run.info.run_id: run.info.status for run in client.search_runs([experiment])
            if LEDGER_OF not in run.data.tags}  # training runs, not the champion ledger
    versions = sorted((v.version for v in client.search_model_versions(f"name='{MODEL_NAME}'")),
                      key=int)
    aliases = {alias: str(version)
               for alias, version in client.get_registered_model(MODEL_NAME).aliases.items()}
    return Registry(runs, [str(v) for v in versions], aliases)


def _outputs(repo: Repo) -> dict[Path, bytes]:
    """The pipeline's outputs in the workspace, by content."""
    return {path: path.read_bytes() for folder in ("models", "metrics", "plots", "reports")
            for path in (repo.root / folder).rglob("*") if path.is_file()}


def cycle(repo: Repo, *args: str) -> subprocess.CompletedProcess:
    return repo.run(sys.executable, "-m", "pipeline.retrain", *args, check=False)


def start_cycle(repo: Repo, output: Path, *args: str) -> subprocess.Popen:
    with open(output, "w") as stream:
        return subprocess.Popen([sys.executable, "-m", "pipeline.retrain", *args],
                                cwd=repo.root, env=repo.env, stdout=stream,
                                stderr=subprocess.STDOUT, text=True)


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A copy after its first cycle: champion version 1."""
    repo = make_repo(tmp_path_factory.mktemp("retrain-repo"),
                     tmp_path_factory.mktemp("retrain-mirror"))
    first = cycle(repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.splitlines()[-1].startswith("promoted version 1 (test_accuracy ")
    return repo


def test_cycle_with_nothing_new_changes_nothing(repo: Repo) -> None:
    before = registry(repo)
    registration = (repo.root / retrain.REGISTRATION_FILE).read_bytes()

    result = cycle(repo)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith(
        f"nothing changed (champion version {before.champion}, test_accuracy ")
    assert registry(repo) == before  # no new run, no new version, same aliases
    assert (repo.root / retrain.REGISTRATION_FILE).read_bytes() == registration


@dataclass(frozen=True)
class Concurrent:
    before: Registry
    after: Registry  # when the three cycles had ended
    first: subprocess.CompletedProcess  # adds the new images' run
    no_wait: subprocess.CompletedProcess  # started while the first held the lock
    waiting: subprocess.CompletedProcess  # ditto, without --no-wait
    first_running_when_waited: bool


@pytest.fixture(scope="module")
def concurrent(repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Concurrent:
    """New labelled images, then three cycles at once: one works, one exits 75, one waits."""
    scratch = tmp_path_factory.mktemp("concurrent")
    write_extra_folder(scratch / "incoming", {3: 3, 6: 3}, seed=5)
    repo.run(sys.executable, "-m", "pipeline.add_data", str(scratch / "incoming"))
    before = registry(repo)
    lock = repo.root / retrain.LOCK_FILE
    log = repo.root / RETRAIN_LOG

    first = start_cycle(repo, scratch / "first.out")
    waiting = None
    try:
        wait_for(lambda: first.poll() is not None or (
            lock.is_file() and lock.read_text().startswith(f"pid {first.pid} ")),
            "the first cycle to take the lock")
        assert first.poll() is None, (scratch / "first.out").read_text()
        no_wait = cycle(repo, "--no-wait")
        waiting = start_cycle(repo, scratch / "waiting.out")
        wait_for(lambda: f"[pid {waiting.pid}] another cycle is running" in log.read_text(),
                 "the second cycle to wait")
        first_running_when_waited = first.poll() is None
        first.wait(timeout=600)
        waiting.wait(timeout=600)
    finally:
        for process in (first, waiting):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    def completed(process: subprocess.Popen, name: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(process.args, process.returncode,
                                           (scratch / name).read_text(), "")

    return Concurrent(before, registry(repo), completed(first, "first.out"), no_wait,
                      completed(waiting, "waiting.out"), first_running_when_waited)


def test_new_images_give_a_new_run_and_a_recorded_promotion_decision(
    repo: Repo, concurrent: Concurrent
) -> None:
    first = concurrent.first
    assert first.returncode == 0, first.stdout[-3000:]
    outcome = first.stdout.splitlines()[-1]
    assert outcome.startswith(("promoted version 2 (", "kept champion version 1 (")), outcome

    after, before = concurrent.after, concurrent.before
    new_runs = set(after.runs) - set(before.runs)
    assert len(new_runs) == 1 and after.runs[new_runs.pop()] == "FINISHED"
    assert after.versions == ["1", "2"]
    registration = repo.json(str(retrain.REGISTRATION_FILE))
    assert registration["candidate"]["version"] == "2"
    assert registration["champion_after"]["version"] == after.champion

    client = repo.client()
    version = client.get_model_version(MODEL_NAME, "2")
    decision = "promoted" if registration["promoted"] else "kept champion"
    assert version.tags["promotion_decision"] == decision
    assert version.tags["promotion_reason"] == registration["reason"]
    run = client.get_run(version.run_id)
    assert run.data.tags["registered_version"] == "2"
    assert run.data.tags["promoted"] == str(registration["promoted"]).lower()
    old_run = client.get_run(client.get_model_version(MODEL_NAME, "1").run_id)
    assert run.data.tags["data_extra_md5"] != old_run.data.tags["data_extra_md5"]


def test_concurrent_cycles_wait_or_exit_75_and_leave_one_champion(
    repo: Repo, concurrent: Concurrent
) -> None:
    assert concurrent.no_wait.returncode == retrain.EX_TEMPFAIL == 75
    assert "another cycle is running" in concurrent.no_wait.stderr
    assert "--no-wait" in concurrent.no_wait.stderr

    waiting = concurrent.waiting
    assert concurrent.first_running_when_waited
    assert waiting.returncode == 0, waiting.stdout[-3000:]
    assert "waiting for it to finish" in waiting.stdout
    assert waiting.stdout.splitlines()[-1].startswith("nothing changed (champion version ")

    after = registry(repo)
    assert after.versions == ["1", "2"]
    assert after.champion in after.versions
    assert set(after.aliases) <= {CHAMPION, CHALLENGER}
    assert len(set(after.aliases.values())) == len(after.aliases)  # one alias per version
    assert "RUNNING" not in after.runs.values()
    assert repo.json(str(retrain.REGISTRATION_FILE))["champion_after"]["version"] == \
        after.champion


def test_training_that_fails_half_way_leaves_the_champion(repo: Repo) -> None:
    """Download and split succeed; training diverges. The run is FAILED, nothing registered."""
    before = registry(repo)
    conf = repo.root / "conf" / "model" / "softmax.yaml"
    good = conf.read_text()
    bad = yaml.safe_load(good)
    bad.update(optimizer="sgd", learning_rate=1e300, lr_schedule="constant")
    conf.write_text(yaml.safe_dump(bad))  # a cycle composes conf/ into params.yaml first
    outputs = _outputs(repo)
    try:
        result = cycle(repo)
    finally:
        conf.write_text(good)
        repo.run(sys.executable, "-m", "pipeline.commands.params")
        for path, content in outputs.items():  # DVC removed the train stage's before running it
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    assert result.returncode == 1
    assert "training diverged" in result.stdout + result.stderr
    assert "step 'dvc repro' failed" in result.stderr
    after = registry(repo)
    assert after.versions == before.versions and after.aliases == before.aliases
    new_runs = {run: status for run, status in after.runs.items() if run not in before.runs}
    assert list(new_runs.values()) == ["FAILED"]


def test_corrupt_archive_without_a_mirror_fails_and_leaves_the_champion(repo: Repo) -> None:
    before = registry(repo)
    archive = next((repo.root / "data" / "raw").glob("train-labels-*"))
    good, mirror = archive.read_bytes(), repo.env["FMNIST_MIRROR"]
    archive.write_bytes(good[:-20])
    repo.env["FMNIST_MIRROR"] = str(repo.root / "no-mirror-here")
    try:
        result = cycle(repo)
    finally:
        archive.write_bytes(good)
        repo.env["FMNIST_MIRROR"] = mirror

    assert result.returncode == 1
    assert "step 'download' failed" in result.stderr and "champion is untouched" in result.stderr
    assert archive.name in result.stdout + result.stderr
    assert registry(repo) == before
