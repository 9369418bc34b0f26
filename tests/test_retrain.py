"""The retraining cycle: its lock, its outcome line, and whole cycles of the real pipeline.

Whole cycles run in a copy of this repository (tests/repo_copy.py: git, DVC, conf/ composed for
small synthetic archives) with its own sqlite MLflow store: `python -m pipeline.retrain` runs the
real stages (`dvc repro`: download, split, train, evaluate, register), so the promotion decision
and models/registration.json come from the real register stage and a real model registry.

One first cycle is shared by the module. Its data has a labelling mistake (a batch of dresses
filed as shirts, added with `python -m pipeline.add_data`), so the first champion scores below 1
and a later candidate can beat it. Each test gets that repository back as it was after the first
cycle, at the same path: MLflow keeps absolute artifact paths in the store, so a copy elsewhere
would write into the original's mlruns/.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.commands import retrain
from pipeline.support import composition
from pipeline.support.champion_ledger import LEDGER_OF
from pipeline.support.registration_file import (
    ModelVersion,
    Registration,
    describe,
    parse_registration,
    registration_from_record,
)
from pipeline.support.workspace import RETRAIN_LOG, CommandError, child_env
from tests.repo_copy import MODEL_NAME, Repo, make_repo
from tests.synthetic import make_images, write_extra_folder, write_png

DVC = str(Path(sys.executable).parent / "dvc")
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d \[pid \d+\] ")
EXPERIMENT = "fashion-mnist"
DRESS, SANDAL = 3, 5
BAD_BATCH = 120  # mislabelled images: more than the 48 right ones of that class in train


# --- The outcome line -----------------------------------------------------------------------


def _registration(candidate=("3", 0.8512), before=("2", 0.85), after=("3", 0.8512),
                  promoted=True) -> Registration:
    def version(pair):
        return None if pair is None else ModelVersion(*pair)
    return Registration("test_accuracy", version(candidate), version(before),
                        version(after), promoted, "")


@pytest.mark.parametrize(("registration", "changed", "kind", "line"), [
    (_registration(), True, "promoted",
     "promoted version 3 (test_accuracy 0.8512 > champion version 2 0.8500)"),
    (_registration(before=None), True, "promoted",
     "promoted version 3 (test_accuracy 0.8512; no previous champion)"),
    (_registration(candidate=("3", 0.849), after=("2", 0.85), promoted=False), True, "kept",
     "kept champion version 2 (test_accuracy 0.8500; candidate version 3 0.8490)"),
    (_registration(candidate=("3", 0.85), after=("2", 0.85), promoted=False), True, "kept",
     "kept champion version 2 (test_accuracy 0.8500; candidate version 3 0.8500)"),
    (_registration(candidate=("3", 0.849), after=("2", 0.85), promoted=False), False,
     "unchanged", "nothing changed (champion version 2, test_accuracy 0.8500)"),
    (_registration(), False, "unchanged",
     "nothing changed (champion version 3, test_accuracy 0.8512)"),
    (_registration(before=("3", 0.8512)), True, "kept",
     "kept champion version 3 (test_accuracy 0.8512; the candidate is that same version)"),
    (_registration(candidate=("4", 0.31), before=("2", 0.35), after=("4", 0.31)), True,
     "promoted", "promoted version 4 (test_accuracy 0.3100 < champion version 2 0.3500)"),
    (_registration(before=("2", float("nan"))), True, "promoted",  # a champion without metric
     "promoted version 3 (test_accuracy 0.8512 vs champion version 2 nan)"),
    (_registration(candidate=("1", float("nan")), before=None, after=None, promoted=False), True,
     "kept", "no champion: candidate version 1 not promoted (test_accuracy nan)"),
    # The gate's numbers say why: noise kept, a gain promoted, test sets that differ.
    (dataclasses.replace(_registration(candidate=("3", 0.8632), after=("2", 0.8631),
                                       promoted=False),
                         statistics={"test": "mcnemar", "n01": 6, "n10": 5, "p_value": 1.0,
                                     "alpha": 0.05}), True, "kept",
     "kept champion version 2 (test_accuracy 0.8631; candidate version 3 0.8632); gate: "
     "McNemar n01=6 n10=5 p=1 (alpha 0.05)"),
    (dataclasses.replace(_registration(), statistics={
        "test": "bootstrap", "level": 0.95, "ci_low": 0.0004, "ci_high": 0.0021,
        "samples": 1000}), True, "promoted",
     "promoted version 3 (test_accuracy 0.8512 > champion version 2 0.8500); gate: bootstrap "
     "95% CI of the gain [+0.0004, +0.0021] (1000 resamples)"),
    (dataclasses.replace(_registration(candidate=("3", 0.9), after=("2", 0.85), promoted=False),
                         statistics={"test": "mcnemar", "champion_test_digest": "ab" * 32,
                                     "candidate_test_digest": "cd" * 32}), True, "kept",
     "kept champion version 2 (test_accuracy 0.8500; candidate version 3 0.9000); gate: "
     f"mcnemar: not run, test sets differ (champion {'ab' * 8}, candidate {'cd' * 8})"),
    (dataclasses.replace(_registration(), statistics={"test": "none"}), True, "promoted",
     "promoted version 3 (test_accuracy 0.8512 > champion version 2 0.8500)"),
    (dataclasses.replace(_registration(), statistics={"test": "mcnemar", "n01": 9, "n10": 0,
                                                      "p_value": 0.004, "alpha": 0.05}),
     False, "unchanged", "nothing changed (champion version 3, test_accuracy 0.8512)"),
])
def test_outcome_lines(registration: Registration, changed: bool, kind: str, line: str) -> None:
    outcome = describe(registration, changed)
    assert (outcome.kind, outcome.line) == (kind, line)


def test_registration_file_of_the_documented_schema() -> None:
    text = json.dumps({
        "run_id": "abc", "registered_model": "fashion-mnist-softmax", "metric": "test_accuracy",
        "candidate": {"version": "3", "value": 0.8512},
        "champion_before": {"version": "2", "value": 0.85},
        "champion_after": {"version": "3", "value": 0.8512},
        "promoted": True, "reason": "test_accuracy 0.8512 beats champion 0.8500 by +0.0012",
    })
    assert parse_registration(text) == dataclasses.replace(
        _registration(), reason="test_accuracy 0.8512 beats champion 0.8500 by +0.0012")
    first = json.loads(text) | {"champion_before": None}
    assert parse_registration(json.dumps(first)).champion_before is None


def test_the_register_stage_record_formats_without_a_file() -> None:
    """register.py can print the same line from the dict it writes to registration.json."""
    record = {"metric": "test_accuracy", "candidate": {"version": "1", "value": float("nan")},
              "champion_before": None, "champion_after": None, "promoted": False,
              "reason": "candidate test_accuracy is not finite"}
    outcome = describe(registration_from_record(record), changed=True)
    assert outcome.line == ("no champion: candidate version 1 not promoted "
                            "(candidate test_accuracy is not finite)")


@pytest.mark.parametrize(("text", "message"), [
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"metric": "m", "candidate": null}', "missing keys: champion_after, promoted"),
    ('{"metric": "m", "candidate": 3, "champion_after": null, "promoted": false}',
     "candidate must be null or an object"),
])
def test_unusable_registration_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_registration(text)


def test_nothing_changed_is_an_unchanged_registration(tmp_path: Path) -> None:
    registration = (tmp_path / retrain.REGISTRATION_FILE)
    registration.parent.mkdir()
    registration.write_text(json.dumps({
        "metric": "test_accuracy", "candidate": {"version": "1", "value": 0.8},
        "champion_before": None, "champion_after": {"version": "1", "value": 0.8},
        "promoted": True,
    }))
    before = retrain.take_snapshot(tmp_path)
    (tmp_path / "dvc.lock").write_text("changed: only upstream stages ran\n")
    after = retrain.take_snapshot(tmp_path)

    assert retrain.outcome_of(tmp_path, before, after).kind == "unchanged"
    first = retrain.Snapshot(dvc_lock=None, registration=None)
    assert retrain.outcome_of(tmp_path, first, after).kind == "promoted"
    # A CI checkout with pulled outputs: no stage ran, and registration.json is not committed.
    pulled = retrain.outcome_of(tmp_path, first, first)
    assert pulled.kind == "unchanged" and "came from `make pull`" in pulled.line
    stages_ran = retrain.Snapshot(dvc_lock=b"stages: {}\n", registration=None)
    with pytest.raises(CommandError, match="does not exist; is the register stage") as caught:
        retrain.outcome_of(tmp_path, first, stages_ran)
    assert caught.value.step == "read outcome"
    registration.write_text("{")
    with pytest.raises(CommandError, match="not valid JSON"):
        retrain.outcome_of(tmp_path, first, retrain.take_snapshot(tmp_path))


def test_retrain_never_talks_to_the_registry() -> None:
    """Only the register stage may change the champion, so a failed cycle cannot: retrain
    neither imports MLflow itself nor through what it imports."""
    tree = ast.parse(Path(retrain.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert "mlflow" not in imported
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.retrain, pipeline.commands.retrain; "
                               "print(sorted(m for m in sys.modules if m.startswith('mlflow')))"],
        capture_output=True, text=True, check=True,
    )
    assert loaded.stdout.strip() == "[]"


def test_steps_compose_first_and_pull_the_extra_images_only_with_a_remote(
    tmp_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    names = [step.name for step in retrain.plan(params, pull_extra=False)]
    assert names == ["params", "download", "dvc repro"]
    steps = retrain.plan(params, pull_extra=True)
    assert [step.name for step in steps] == ["params", "dvc pull", "download", "dvc repro"]
    assert steps[0].argv == (sys.executable, "-m", "pipeline.commands.params")
    assert steps[1].argv[1:] == ("pull", "data.dvc")
    assert steps[2].argv == (sys.executable, "-m", "pipeline.stages.download",
                             "--params", str(params))
    assert Path(steps[3].argv[0]).parent == Path(sys.executable).parent
    names = [step.name for step in retrain.plan(params, pull_extra=False, compose=False)]
    assert names == ["download", "dvc repro"]


def test_child_environment_puts_the_virtualenv_first() -> None:
    env = child_env({"PATH": "/usr/bin:/bin", "HOME": "/root"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["HOME"] == "/root"


# --- The lock -------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from pipeline.commands.retrain import cycle_lock
    with cycle_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the test closes stdin
""")


@pytest.fixture
def lock_holder():
    """Factory: another process that holds the cycle lock of `root` until stdin is closed."""
    started: list[subprocess.Popen] = []

    def hold(lock: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield hold
    for process in started:
        if process.stdin and not process.stdin.closed:
            process.stdin.close()
        process.wait(timeout=10)


def test_lock_busy_without_waiting(tmp_path: Path, lock_holder) -> None:
    lock = tmp_path / "logs" / "retrain.lock"
    holder = lock_holder(lock)
    with pytest.raises(retrain.LockBusy, match=rf"held by pid {holder.pid} since"), \
            retrain.cycle_lock(lock, wait=False):
        pytest.fail("entered a lock held by another process")


def test_second_cycle_waits_for_the_first(tmp_path: Path, lock_holder) -> None:
    lock = tmp_path / "retrain.lock"
    holder = lock_holder(lock)
    waited_for: list[str] = []

    def on_wait(who: str) -> None:
        waited_for.append(who)
        holder.stdin.close()  # the first cycle ends while the second waits

    with retrain.cycle_lock(lock, wait=True, on_wait=on_wait):
        assert lock.read_text().startswith(f"pid {os.getpid()} since")
    assert len(waited_for) == 1 and waited_for[0].startswith(f"pid {holder.pid}")
    with retrain.cycle_lock(lock, wait=False):  # released on exit
        pass


def test_no_wait_exits_75_without_running_anything(
    tmp_path: Path, lock_holder, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "conf").mkdir()  # composing params.yaml is part of the locked cycle
    (tmp_path / "conf" / "config.yaml").write_text("data: {}\n")
    lock_holder(tmp_path / retrain.LOCK_FILE)

    code = retrain.main(["--params", str(tmp_path / "params.yaml"), "--no-wait"])

    out, err = capsys.readouterr()
    assert code == retrain.EX_TEMPFAIL == 75
    assert "another cycle is running" in err and "--no-wait" in err
    assert "start" not in out
    log = (tmp_path / RETRAIN_LOG).read_text().splitlines()
    assert len(log) == 1 and STAMPED.match(log[0]) and "not waiting" in log[0]
    assert not (tmp_path / "params.yaml").exists()


def test_missing_params_or_repository(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert retrain.main(["--params", str(tmp_path / "params.yaml")]) == 1
    assert "no dvc.yaml" in capfd.readouterr().err
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert retrain.main(["--params", str(tmp_path / "params.yaml")]) == 1
    assert "step 'read parameters' failed" in capfd.readouterr().err


# --- The registry, as MLflow reports it -----------------------------------------------------


@contextmanager
def mlflow_client(root: Path) -> Iterator[Any]:
    """A client of the repository's own store.

    Without a connection pool: tests put a fresh copy of the store at the same path, and a pooled
    connection would go on reading the file that was deleted. Only this process's reads are
    affected; the stages run with MLflow's defaults.
    """
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclasses.dataclass(frozen=True)
class Registry:
    """What a cycle may change: the runs, the versions (with the metric they were registered
    with) and where the aliases point."""

    runs: dict[str, str]  # run id -> status
    versions: dict[str, float]  # version -> test_accuracy
    aliases: dict[str, str]  # alias -> version


def registry(root: Path) -> Registry:
    with mlflow_client(root) as client:
        experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
        runs = {run.info.run_id: run.info.status for run in client.search_runs([experiment])
                if LEDGER_OF not in run.data.tags}  # training runs, not the champion ledger
        versions = {str(v.version): float(v.tags["test_accuracy"])
                    for v in client.search_model_versions(f"name='{MODEL_NAME}'")}
        aliases = {alias: str(version) for alias, version
                   in client.get_registered_model(MODEL_NAME).aliases.items()}
    return Registry(runs, dict(sorted(versions.items(), key=lambda item: int(item[0]))), aliases)


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _state(root: Path) -> dict[str, Any]:
    """Everything a cycle that fails or finds nothing new must leave as it was."""
    return {"registry": registry(root),
            "registration": _read(root / retrain.REGISTRATION_FILE),
            "dvc.lock": _read(root / "dvc.lock")}


# --- Whole cycles ---------------------------------------------------------------------------


def _mislabelled(directory: Path, true_class: int, folder: str, n: int, seed: int) -> None:
    """`n` images of `true_class` filed under the class folder `folder`: a labelling mistake."""
    for i, image in enumerate(make_images([true_class] * n, seed=seed)):
        write_png(directory / folder / f"class{true_class}_{i:03d}.png", image)


@dataclasses.dataclass
class FirstCycle:
    repo: Repo
    snapshot: Path  # the repository right after the first cycle
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def first_cycle(tmp_path_factory: pytest.TempPathFactory) -> FirstCycle:
    """A repository after its first cycle, run as the command line does: from the repository
    root, with the default parameter file."""
    base = tmp_path_factory.mktemp("retrain")
    repo = make_repo(base / "repo", base / "mirror")
    _mislabelled(base / "incoming", DRESS, "shirt", BAD_BATCH, seed=5)
    repo.run(sys.executable, "-m", "pipeline.add_data", str(base / "incoming"))
    repo.run("git", "-c", "user.name=test", "-c", "user.email=test@localhost",
             "commit", "-qm", "Add labelled images", "data.dvc")
    result = repo.run(sys.executable, "-m", "pipeline.retrain", check=False)
    snapshot = base / "after-first-cycle"
    shutil.copytree(repo.root, snapshot, symlinks=True)
    return FirstCycle(repo, snapshot, result)


@pytest.fixture
def trained(first_cycle: FirstCycle, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The repository as the first cycle left it, and this process's environment set up like
    the first cycle's (the synthetic mirror, no MLflow settings) for `retrain.main`."""
    result = first_cycle.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    root = first_cycle.repo.root
    shutil.rmtree(root)
    shutil.copytree(first_cycle.snapshot, root, symlinks=True)
    for key in [key for key in os.environ if key.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FMNIST_MIRROR", first_cycle.repo.env["FMNIST_MIRROR"])
    return root


def _cycle(root: Path, capfd: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = retrain.main(["--params", str(root / "params.yaml"), *args])
    out, err = capfd.readouterr()
    return code, out, err


def _update_yaml(path: Path, section: str | None = None, **values: Any) -> None:
    content = yaml.safe_load(path.read_text())
    (content[section] if section else content).update(values)
    path.write_text(yaml.safe_dump(content, sort_keys=False))


def _mcnemar(root: Path) -> str:
    """The gate's numbers as the outcome line gives them, from the cycle's registration."""
    stats = json.loads((root / retrain.REGISTRATION_FILE).read_text())["statistics"]
    assert stats["test"] == "mcnemar"
    return (f"McNemar n01={stats['n01']} n10={stats['n10']} p={stats['p_value']:.4g} "
            f"(alpha {stats['alpha']})")


def _log_messages(root: Path) -> list[str]:
    lines = (root / RETRAIN_LOG).read_text().splitlines()
    assert all(STAMPED.match(line) for line in lines), lines
    return [STAMPED.sub("", line) for line in lines]


@pytest.mark.slow
def test_first_cycle_trains_registers_promotes_and_logs_each_step(
    first_cycle: FirstCycle, trained: Path
) -> None:
    result = first_cycle.result
    output = result.stdout + result.stderr
    for stage in ("download", "split", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in output  # DVC's own output
    after = registry(trained)
    assert list(after.runs.values()) == ["FINISHED"]
    assert list(after.versions) == ["1"] and after.aliases == {"champion": "1"}
    accuracy = after.versions["1"]
    assert accuracy < 1  # the mislabelled batch: a later candidate can do better
    outcome = f"promoted version 1 (test_accuracy {accuracy:.4f}; no previous champion)"
    assert result.stdout.splitlines()[-1] == outcome

    registration = json.loads((trained / retrain.REGISTRATION_FILE).read_text())
    run_id = json.loads((trained / "models" / "run.json").read_text())["run_id"]
    assert registration["run_id"] == run_id == next(iter(after.runs))
    assert registration["promoted"] is True and registration["champion_before"] is None

    messages = _log_messages(trained)
    assert messages[0] == f"start: cycle in {trained} with params.yaml"
    assert "no DVC remote configured: using data/extra as it is" in messages
    steps = [m.split(":")[0] for m in messages if m.startswith("step ") and "done in" not in m]
    assert steps == ["step params", "step download", "step dvc repro"]
    assert any(m.startswith("step dvc repro: done in") for m in messages)
    assert messages[-1] == f"outcome: {outcome}"


@pytest.mark.slow
def test_cycle_with_nothing_new_changes_nothing_logged_as_cron_does(
    first_cycle: FirstCycle, trained: Path
) -> None:
    before = _state(trained)
    log = trained / RETRAIN_LOG
    lines_before = len(log.read_text().splitlines())
    with open(log, "a") as stream:  # cron: `... >> logs/retrain.log 2>&1`
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.retrain", "--no-wait"], cwd=trained,
            env=first_cycle.repo.env, stdout=stream, stderr=subprocess.STDOUT,
        )

    assert result.returncode == 0, log.read_text()[-3000:]
    assert _state(trained) == before  # no run, no version, no alias moved, no file rewritten
    new = log.read_text().splitlines()[lines_before:]
    own = [line for line in new if STAMPED.match(line)]
    assert [line for line in new if "outcome:" in line] == [own[-1]]  # once, timestamped
    champion = before["registry"].versions["1"]
    assert own[-1].endswith(
        f"outcome: nothing changed (champion version 1, test_accuracy {champion:.4f})")
    assert not any(line.startswith("retrain: ") for line in new)


@pytest.mark.slow
def test_a_cycle_after_a_switch_of_store_records_the_run_in_the_new_store(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """DVC finds every stage up to date, but the store now in use has never seen the run: the
    cycle records it there, as `make train` does, instead of saying "nothing changed"."""
    from mlflow.tracking import MlflowClient

    new_store = trained / "new-store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{new_store}")
    old_registry = registry(trained)

    code, out, err = _cycle(trained, capfd)

    assert code == 0, err
    assert "is not in" in out or "has no run" in out, out
    assert re.search(r"retrain: step record in store: \S*dvc repro --force --downstream train",
                     out), out
    accuracy = json.loads((trained / retrain.REGISTRATION_FILE).read_text())["candidate"]["value"]
    assert out.splitlines()[-1] == (
        f"promoted version 1 (test_accuracy {accuracy:.4f}; no previous champion)")
    client = MlflowClient(tracking_uri=f"sqlite:///{new_store}")
    assert {alias: str(version) for alias, version in
            client.get_registered_model(MODEL_NAME).aliases.items()} == {"champion": "1"}
    assert registry(trained) == old_registry  # the old store is as it was
    # A second cycle in the new store has nothing left to record.
    code, out, err = _cycle(trained, capfd)
    assert code == 0, err
    assert "record in store" not in out
    assert out.splitlines()[-1].startswith("nothing changed (champion version 1, ")


@pytest.mark.slow
def test_cycle_without_a_mirror_setting_finds_the_shared_archives_beside_the_checkout(
    first_cycle: FirstCycle, trained: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture
) -> None:
    """Cron and systemd start cycles without make, so without FMNIST_MIRROR: the download step
    still finds ../shared/fashion-mnist, here for a clone that has no data/raw yet."""
    monkeypatch.delenv("FMNIST_MIRROR")
    shared = trained.parent / "shared" / "fashion-mnist"
    shutil.copytree(first_cycle.repo.env["FMNIST_MIRROR"], shared)
    shutil.rmtree(trained / "data" / "raw")
    before = _state(trained)
    try:
        code, out, err = _cycle(trained, capfd)
    finally:
        shutil.rmtree(shared.parent)

    assert code == 0, err
    assert out.count("MD5 OK") == 4 and f"from {shared}" in out
    assert out.splitlines()[-1].startswith("nothing changed (champion version 1, ")
    assert _state(trained) == before


@pytest.mark.slow
def test_cycle_composes_conf_into_params_before_the_other_steps(
    trained: Path, capfd: pytest.CaptureFixture
) -> None:
    _update_yaml(trained / "conf" / "data" / "fashion_mnist.yaml", "download", retries=2)
    before = registry(trained)

    code, out, err = _cycle(trained, capfd)

    assert code == 0, err
    params = trained / "params.yaml"
    assert yaml.safe_load(params.read_text())["data"]["download"]["retries"] == 2
    assert params.read_text() == composition.compose(trained)
    assert "params: wrote params.yaml from conf/" in out
    steps = [line for line in out.splitlines() if re.match(r"retrain: step \S+: ", line)]
    assert steps[0].startswith("retrain: step params: ")
    assert out.splitlines()[-1].startswith("nothing changed (champion version 1, ")
    assert registry(trained) == before  # no stage depends on data.download


@pytest.mark.slow
def test_without_conf_the_params_file_is_used_as_it_is(
    trained: Path, capfd: pytest.CaptureFixture
) -> None:
    shutil.rmtree(trained / "conf")
    params = (trained / "params.yaml").read_bytes()

    code, out, err = _cycle(trained, capfd)

    assert code == 0, err
    assert f"retrain: no conf/ in {trained}: using params.yaml as it is" in out
    assert "step params" not in out
    assert (trained / "params.yaml").read_bytes() == params
    assert out.splitlines()[-1].startswith("nothing changed (champion version 1, ")


@pytest.mark.slow
def test_conf_that_composes_to_invalid_parameters_fails_the_cycle_first(
    trained: Path, capfd: pytest.CaptureFixture
) -> None:
    _update_yaml(trained / "conf" / "data" / "fashion_mnist.yaml", "download", retries=-1)
    before = (trained / "params.yaml").read_bytes(), _state(trained)

    code, out, err = _cycle(trained, capfd)

    assert code == 1
    assert "step 'params' failed" in err and "invalid configuration" in err
    assert "step download" not in out
    assert ((trained / "params.yaml").read_bytes(), _state(trained)) == before


@pytest.mark.slow
def test_corrupt_raw_archive_fails_at_download_and_keeps_the_champion(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FMNIST_MIRROR", "")  # no local mirror; params.yaml names no other
    assert yaml.safe_load((trained / "params.yaml").read_text())["data"]["mirrors"] == []
    raw = next((trained / "data" / "raw").glob("train-labels-*"))
    raw.write_bytes(raw.read_bytes()[:-10])
    before = _state(trained)

    code, out, err = _cycle(trained, capfd)

    assert code == 1
    log = trained / RETRAIN_LOG
    assert "step 'download' failed: exited with code 1" in err and str(log) in err
    assert "champion is untouched" in err
    assert raw.name in out + err
    assert "step dvc repro" not in out
    assert _state(trained) == before
    assert "step 'download' failed" in log.read_text().splitlines()[-1]


@pytest.mark.slow
def test_failed_training_fails_the_cycle_and_keeps_the_champion(
    trained: Path, capfd: pytest.CaptureFixture
) -> None:
    """Split succeeds, training diverges: the run is FAILED and register never runs."""
    _update_yaml(trained / "conf" / "model" / "softmax.yaml", optimizer="sgd",
                 learning_rate=1e300, lr_schedule="constant")
    before = _state(trained)

    code, out, err = _cycle(trained, capfd)

    assert code == 1
    assert "step 'dvc repro' failed" in err and "training diverged" in out + err
    assert "Running stage 'train'" in out + err and "Running stage 'register'" not in out + err
    after = registry(trained)
    assert (after.versions, after.aliases) == (before["registry"].versions,
                                               before["registry"].aliases)
    new_runs = [status for run, status in after.runs.items()
                if run not in before["registry"].runs]
    assert new_runs == ["FAILED"]
    assert _read(trained / retrain.REGISTRATION_FILE) == before["registration"]


@pytest.mark.slow
def test_better_candidate_is_promoted_then_a_worse_one_is_not(
    trained: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    extra = trained / "data" / "extra"
    mistakes = sorted((extra / "shirt").glob(f"class{DRESS}_*.png"))
    assert len(mistakes) == BAD_BATCH
    (extra / "dress").mkdir(exist_ok=True)
    for image in mistakes:  # the labelling mistake is fixed: the dresses go where they belong
        image.rename(extra / "dress" / image.name)
    subprocess.run([DVC, "commit", "-f", "-q", "data.dvc"], cwd=trained, check=True)

    code, out, err = _cycle(trained, capfd)

    assert code == 0, err
    first = registry(trained)
    old, new = first.versions["1"], first.versions["2"]
    assert new > old
    assert out.splitlines()[-1] == (
        f"promoted version 2 (test_accuracy {new:.4f} > champion version 1 {old:.4f})"
        f"; gate: {_mcnemar(trained)}")
    assert first.aliases == {"champion": "2"}

    # Another batch with a mistake (sandals filed as bags), added the documented way.
    _mislabelled(tmp_path / "incoming", SANDAL, "bag", BAD_BATCH, seed=11)
    added = subprocess.run([sys.executable, "-m", "pipeline.add_data", str(tmp_path / "incoming")],
                           cwd=trained, capture_output=True, text=True)
    assert added.returncode == 0, added.stderr

    code, out, err = _cycle(trained, capfd)

    assert code == 0, err
    second = registry(trained)
    worse = second.versions["3"]
    assert worse < new
    assert out.splitlines()[-1] == (
        f"kept champion version 2 (test_accuracy {new:.4f}; candidate version 3 {worse:.4f})"
        f"; gate: {_mcnemar(trained)}")
    assert second.aliases == {"champion": "2", "challenger": "3"}
    assert list(second.runs.values()).count("FINISHED") == 3


@pytest.mark.slow
def test_with_a_remote_the_extra_images_are_pulled_and_trained_on(
    trained: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    extra = trained / "data" / "extra"
    write_extra_folder(extra, {DRESS: 2}, seed=9)
    subprocess.run([DVC, "commit", "-f", "-q", "data.dvc"], cwd=trained, check=True)
    subprocess.run([DVC, "remote", "add", "-d", "storage", str(tmp_path / "remote")],
                   cwd=trained, check=True)
    subprocess.run([DVC, "push", "-q", "data.dvc"], cwd=trained, check=True)
    pushed = yaml.safe_load((trained / "data.dvc").read_text())["outs"][0]["md5"]
    shutil.rmtree(extra)  # a fresh clone: the images are only in the remote
    shutil.rmtree(trained / ".dvc" / "cache")

    code, out, err = _cycle(trained, capfd)

    assert code == 0, err
    assert len(list(extra.rglob("*.png"))) == BAD_BATCH + 2
    assert "DVC remotes: storage" in out
    assert "step dvc pull: " in out
    assert out.splitlines()[-1].startswith(("promoted version 2 (", "kept champion version 1 ("))
    registration = json.loads((trained / retrain.REGISTRATION_FILE).read_text())
    assert registration["candidate"]["version"] == "2"
    with mlflow_client(trained) as client:
        run = client.get_run(registration["run_id"])
    assert run.data.tags["data_extra_md5"] == pushed  # trained on what was pulled
