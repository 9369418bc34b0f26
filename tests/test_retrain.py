"""The retraining cycle: its lock, its outcome line, and whole cycles in a real DVC repository.

The repository is a stand-in for this one: the real download stage, then a `register` stage that
plays train + evaluate + register against a JSON "registry" (the candidate's accuracy is read from
candidate.txt, so a test decides whether it beats the champion). It has no conf/ (so its
params.yaml is used as written) unless a test adds one. The real pipeline with MLflow is tested
end to end elsewhere.
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
from pathlib import Path

import pytest
import yaml

from pipeline import params as params_module
from pipeline import retrain
from tests.conftest import Archives
from tests.synthetic import REPO_ROOT, data_params, write_extra_folder, write_params

DVC = str(Path(sys.executable).parent / "dvc")
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d \[pid \d+\] ")

FAKE_REGISTER = '''\
"""Train + evaluate + register in one: candidate.txt holds the accuracy, or "fail"."""
import json
import sys
from pathlib import Path

value = Path("candidate.txt").read_text().strip()
if value == "fail":
    sys.exit("training failed")
registry_path = Path("registry.json")
registry = (json.loads(registry_path.read_text()) if registry_path.exists()
            else {"versions": {}, "champion": None})
version = str(len(registry["versions"]) + 1)
registry["versions"][version] = float(value)
champion = registry["champion"]
before = None if champion is None else {"version": champion,
                                         "value": registry["versions"][champion]}
promoted = before is None or float(value) > before["value"]
if promoted:
    registry["champion"] = version
after = {"version": registry["champion"], "value": registry["versions"][registry["champion"]]}
Path("models").mkdir(exist_ok=True)
Path("models/registration.json").write_text(json.dumps({
    "run_id": "run" + version, "registered_model": "fashion-mnist-softmax",
    "metric": "test_accuracy", "candidate": {"version": version, "value": float(value)},
    "champion_before": before, "champion_after": after, "promoted": promoted,
    "reason": "promoted" if promoted else "kept",
}))
registry_path.write_text(json.dumps(registry))
'''

DVC_YAML = """\
stages:
  download:
    cmd: python -m pipeline.download
    params:
      - data.files
    outs:
      - data/raw:
          persist: true
  register:
    cmd: python fake_register.py
    deps:
      - fake_register.py
      - candidate.txt
      - data/raw
      - data/extra
    outs:
      - models/registration.json:
          cache: false
"""


# --- The outcome line -----------------------------------------------------------------------


def _registration(candidate=("3", 0.8512), before=("2", 0.85), after=("3", 0.8512),
                  promoted=True) -> retrain.Registration:
    def version(pair):
        return None if pair is None else retrain.ModelVersion(*pair)
    return retrain.Registration("test_accuracy", version(candidate), version(before),
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
])
def test_outcome_lines(registration: retrain.Registration, changed: bool, kind: str,
                       line: str) -> None:
    outcome = retrain.describe(registration, changed)
    assert (outcome.kind, outcome.line) == (kind, line)


def test_registration_file_of_the_documented_schema() -> None:
    text = json.dumps({
        "run_id": "abc", "registered_model": "fashion-mnist-softmax", "metric": "test_accuracy",
        "candidate": {"version": "3", "value": 0.8512},
        "champion_before": {"version": "2", "value": 0.85},
        "champion_after": {"version": "3", "value": 0.8512},
        "promoted": True, "reason": "test_accuracy 0.8512 beats champion 0.8500 by +0.0012",
    })
    assert retrain.parse_registration(text) == dataclasses.replace(
        _registration(), reason="test_accuracy 0.8512 beats champion 0.8500 by +0.0012")
    first = json.loads(text) | {"champion_before": None}
    assert retrain.parse_registration(json.dumps(first)).champion_before is None


def test_the_register_stage_record_formats_without_a_file() -> None:
    """register.py can print the same line from the dict it writes to registration.json."""
    record = {"metric": "test_accuracy", "candidate": {"version": "1", "value": float("nan")},
              "champion_before": None, "champion_after": None, "promoted": False,
              "reason": "candidate test_accuracy is not finite"}
    outcome = retrain.describe(retrain.registration_from_record(record), changed=True)
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
        retrain.parse_registration(text)


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
    with pytest.raises(retrain.RetrainError, match="does not exist; is the register stage"):
        retrain.outcome_of(tmp_path, first, first)


def test_retrain_never_talks_to_the_registry() -> None:
    """Only the register stage may change the champion, so a failed cycle cannot."""
    tree = ast.parse(Path(retrain.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert "mlflow" not in imported


def test_steps_compose_first_and_pull_the_extra_images_only_with_a_remote(
    tmp_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    names = [step.name for step in retrain.plan(params, pull_extra=False)]
    assert names == ["params", "download", "dvc repro"]
    steps = retrain.plan(params, pull_extra=True)
    assert [step.name for step in steps] == ["params", "dvc pull", "download", "dvc repro"]
    assert steps[0].argv == (sys.executable, "-m", "pipeline.params")
    assert steps[1].argv[1:] == ("pull", "data.dvc")
    assert steps[2].argv == (sys.executable, "-m", "pipeline.download", "--params", str(params))
    assert Path(steps[3].argv[0]).parent == Path(sys.executable).parent
    names = [step.name for step in retrain.plan(params, pull_extra=False, compose=False)]
    assert names == ["download", "dvc repro"]


def test_child_environment_puts_the_virtualenv_first() -> None:
    env = retrain.child_env({"PATH": "/usr/bin:/bin", "HOME": "/root"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["HOME"] == "/root"


def test_shared_mirror_next_to_the_checkout_is_used_as_make_does(tmp_path: Path) -> None:
    root, shared = tmp_path / "main", tmp_path / "shared" / "fashion-mnist"
    root.mkdir()
    shared.mkdir(parents=True)
    assert retrain.with_shared_mirror({}, root) == {}  # no archives there
    (shared / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    assert retrain.with_shared_mirror({}, root) == {"FMNIST_MIRROR": str(shared)}
    assert retrain.with_shared_mirror({"FMNIST_MIRROR": ""}, root) == {
        "FMNIST_MIRROR": str(shared)}
    assert retrain.with_shared_mirror({"FMNIST_MIRROR": "/elsewhere"}, root) == {
        "FMNIST_MIRROR": "/elsewhere"}


# --- The lock -------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from pipeline.retrain import cycle_lock
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
    log = (tmp_path / retrain.LOG_FILE).read_text().splitlines()
    assert len(log) == 1 and STAMPED.match(log[0]) and "not waiting" in log[0]
    assert not (tmp_path / "params.yaml").exists()


# --- Whole cycles ---------------------------------------------------------------------------


def _make_repo(root: Path, archives: Archives) -> Path:
    root.mkdir(parents=True)
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([DVC, "config", "core.analytics", "false"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "fake_register.py").write_text(FAKE_REGISTER)
    (root / "candidate.txt").write_text("0.8\n")
    write_params(root / "params.yaml", data_params(archives.specs,
                                                   mirrors=[str(archives.directory)]))
    shutil.copyfile(REPO_ROOT / "data.dvc", root / "data.dvc")
    return root


def _cycle(root: Path, capfd: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = retrain.main(["--params", str(root / "params.yaml"), *args])
    out, err = capfd.readouterr()
    return code, out, err


@dataclasses.dataclass
class FirstCycle:
    root: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def first_cycle(tmp_path_factory: pytest.TempPathFactory, archives: Archives) -> FirstCycle:
    """A repository after its first cycle (champion version 1, test_accuracy 0.8), run as the
    command line does: from the repository root, with the default parameter file."""
    root = _make_repo(tmp_path_factory.mktemp("retrain") / "repo", archives)
    result = subprocess.run([sys.executable, "-m", "pipeline.retrain"], cwd=root,
                            capture_output=True, text=True)
    return FirstCycle(root, result)


@pytest.fixture
def trained(tmp_path: Path, first_cycle: FirstCycle) -> Path:
    assert first_cycle.result.returncode == 0, first_cycle.result.stderr
    root = tmp_path / "repo"
    shutil.copytree(first_cycle.root, root, symlinks=True)
    return root


def _state(root: Path) -> dict[str, bytes | None]:
    names = ["registry.json", "models/registration.json", "dvc.lock"]
    return {name: (root / name).read_bytes() if (root / name).exists() else None
            for name in names}


def test_first_cycle_promotes_and_logs_each_step(first_cycle: FirstCycle) -> None:
    root, result = first_cycle.root, first_cycle.result

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "promoted version 1 (test_accuracy 0.8000; no previous champion)")
    assert "Running stage 'register'" in result.stdout + result.stderr  # DVC's output too
    assert (root / "data" / "extra").is_dir()
    log = (root / retrain.LOG_FILE).read_text().splitlines()
    assert all(STAMPED.match(line) for line in log)
    messages = [STAMPED.sub("", line) for line in log]
    assert messages[0].startswith("start: cycle in")
    assert f"no conf/ in {root}: using params.yaml as it is" in messages  # a stand-in
    assert not any(m.startswith("step params") for m in messages)
    assert "no DVC remote configured: using data/extra as it is" in messages
    assert any(m.startswith("step download: ") for m in messages)
    assert any(m.startswith("step dvc repro: done in") for m in messages)
    assert messages[-1] == (
        "outcome: promoted version 1 (test_accuracy 0.8000; no previous champion)")


def test_cycle_with_nothing_new_changes_nothing_logged_as_cron_does(trained: Path) -> None:
    before = _state(trained)
    log = trained / retrain.LOG_FILE
    lines_before = len(log.read_text().splitlines())
    with open(log, "a") as stream:  # cron: `... >> logs/retrain.log 2>&1`
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.retrain", "--no-wait"], cwd=trained,
            stdout=stream, stderr=subprocess.STDOUT,
        )

    assert result.returncode == 0
    assert _state(trained) == before
    new = log.read_text().splitlines()[lines_before:]
    own = [line for line in new if STAMPED.match(line)]
    assert [line for line in new if "outcome:" in line] == [own[-1]]  # once, timestamped
    assert own[-1].endswith("outcome: nothing changed (champion version 1, test_accuracy 0.8000)")
    assert not any(line.startswith("retrain: ") for line in new)


def _conf_from_params(root: Path, **download: float) -> dict:
    """A conf/ that composes to the repository's params.yaml with these `data.download` values."""
    composed = yaml.safe_load((root / "params.yaml").read_text())
    composed["data"]["download"].update(download)
    (root / "conf").mkdir()
    (root / "conf" / "config.yaml").write_text(yaml.safe_dump(composed, sort_keys=False))
    return composed


def test_cycle_composes_conf_into_params_before_the_other_steps(
    trained: Path, capfd: pytest.CaptureFixture
) -> None:
    composed = _conf_from_params(trained, retries=2)

    code, out, err = _cycle(trained, capfd)

    assert code == 0, err
    assert yaml.safe_load((trained / "params.yaml").read_text()) == composed
    assert (trained / "params.yaml").read_text() == params_module.compose(trained)
    assert "params: wrote params.yaml from conf/" in out
    steps = [line for line in out.splitlines() if re.match(r"retrain: step \S+: ", line)]
    assert steps[0].startswith("retrain: step params: ")
    assert out.splitlines()[-1].startswith("nothing changed (champion version 1")


def test_conf_that_composes_to_invalid_parameters_fails_the_cycle_first(
    trained: Path, capfd: pytest.CaptureFixture
) -> None:
    _conf_from_params(trained, retries=-1)
    before = (trained / "params.yaml").read_bytes(), _state(trained)

    code, out, err = _cycle(trained, capfd)

    assert code == 1
    assert "step 'params' failed" in err and "invalid configuration" in err
    assert "step download" not in out
    assert ((trained / "params.yaml").read_bytes(), _state(trained)) == before


@pytest.mark.slow
def test_better_candidate_is_promoted_then_a_worse_one_is_not(
    trained: Path, capfd: pytest.CaptureFixture
) -> None:
    (trained / "candidate.txt").write_text("0.85\n")
    code, out, _ = _cycle(trained, capfd)
    assert code == 0
    assert out.splitlines()[-1] == (
        "promoted version 2 (test_accuracy 0.8500 > champion version 1 0.8000)")

    (trained / "candidate.txt").write_text("0.83\n")
    code, out, _ = _cycle(trained, capfd)
    assert code == 0
    assert out.splitlines()[-1] == (
        "kept champion version 2 (test_accuracy 0.8500; candidate version 3 0.8300)")


def test_corrupt_raw_archive_fails_at_download_and_keeps_the_champion(
    trained: Path, archives: Archives, capfd: pytest.CaptureFixture
) -> None:
    write_params(trained / "params.yaml", data_params(archives.specs, mirrors=[]))
    raw = trained / "data" / "raw" / archives.specs["train_labels"].name
    raw.write_bytes(raw.read_bytes()[:-10])
    (trained / "candidate.txt").write_text("0.99\n")  # would be promoted if register ran
    before = _state(trained)

    code, out, err = _cycle(trained, capfd)

    assert code == 1
    log = trained / retrain.LOG_FILE
    assert "step 'download' failed: exited with code 1" in err and str(log) in err
    assert "champion is untouched" in err
    assert _state(trained) == before
    assert "step 'download' failed" in log.read_text().splitlines()[-1]


def test_failed_training_fails_the_cycle_and_keeps_the_champion(
    trained: Path, capfd: pytest.CaptureFixture
) -> None:
    (trained / "candidate.txt").write_text("fail\n")
    before = _state(trained)

    code, _, err = _cycle(trained, capfd)

    assert code == 1
    assert "step 'dvc repro' failed" in err and "training failed" in err
    assert _state(trained)["registry.json"] == before["registry.json"]
    assert _state(trained)["models/registration.json"] is None  # DVC removed the stale output


@pytest.mark.slow
def test_with_a_remote_the_extra_images_are_pulled_and_trained_on(
    trained: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    extra = trained / "data" / "extra"
    write_extra_folder(extra, {3: 2})
    subprocess.run([DVC, "commit", "-f", "-q", "data.dvc"], cwd=trained, check=True)
    subprocess.run([DVC, "remote", "add", "-d", "storage", str(tmp_path / "remote")],
                   cwd=trained, check=True)
    subprocess.run([DVC, "push", "-q", "data.dvc"], cwd=trained, check=True)
    shutil.rmtree(extra)  # a fresh clone: the images are only in the remote
    shutil.rmtree(trained / ".dvc" / "cache")

    code, out, err = _cycle(trained, capfd)

    assert code == 0, err
    assert len(list(extra.rglob("*.png"))) == 2
    assert "DVC remotes: storage" in out
    assert "step dvc pull: " in out
    assert out.splitlines()[-1].startswith("kept champion version 1")  # retrained, same score


def test_missing_params_or_repository(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert retrain.main(["--params", str(tmp_path / "params.yaml")]) == 1
    assert "no dvc.yaml" in capfd.readouterr().err
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert retrain.main(["--params", str(tmp_path / "params.yaml")]) == 1
    assert "step 'read parameters' failed" in capfd.readouterr().err
