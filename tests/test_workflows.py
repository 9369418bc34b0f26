"""The GitHub Actions retraining workflow: triggers, secrets, steps, and its shell snippets run
for real with bash on sample inputs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.commands import schedule
from tests.synthetic import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "retrain.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def _triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean True; GitHub reads it as "on".
    return workflow.get("on", workflow.get(True))


def _steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    return workflow["jobs"]["retrain"]["steps"]


def _index(steps: list[dict[str, Any]], pattern: str) -> int:
    found = [i for i, step in enumerate(steps) if re.search(pattern, step.get("run", ""))]
    assert found, f"no step runs {pattern!r}"
    return found[0]


def _script(workflow: dict[Any, Any], name: str) -> str:
    [step] = [step for step in _steps(workflow) if step.get("name") == name]
    return step["run"]


def test_triggers_weekly_and_by_hand(workflow: dict[Any, Any]) -> None:
    triggers = _triggers(workflow)
    assert "workflow_dispatch" in triggers
    [entry] = triggers["schedule"]
    assert entry["cron"] == schedule.PRESETS["weekly"][0]


def test_runs_never_overlap_nor_cancel_each_other(workflow: dict[Any, Any]) -> None:
    concurrency = workflow["concurrency"]
    assert concurrency["group"] and concurrency["cancel-in-progress"] is False
    assert workflow["permissions"]["contents"] == "write"  # to push dvc.lock


def test_job_sets_up_python_311_and_runs_the_cycle(workflow: dict[Any, Any]) -> None:
    job = workflow["jobs"]["retrain"]
    assert job["runs-on"] == "ubuntu-latest" and job["timeout-minutes"] > 0
    steps = _steps(workflow)
    uses = [step["uses"] for step in steps if "uses" in step]
    assert all(re.fullmatch(r"[\w-]+/[\w-]+@v\d+", use) for use in uses), uses
    [python] = [step for step in steps if step.get("uses", "").startswith("actions/setup-python")]
    assert python["with"]["python-version"] == "3.11"  # a string: 3.11 unquoted is 3.1
    order = [_index(steps, pattern) for pattern in (
        r"^make setup", r"^make pull$", r"^make retrain", r"^make push$",
        r"git commit", r"git push")]
    assert order == sorted(order), "setup, pull, retrain, push, then git"
    assert workflow["defaults"]["run"]["shell"] == "bash"  # pipefail for `make retrain | tee`


def test_secrets_configure_dvc_and_mlflow(workflow: dict[Any, Any]) -> None:
    env = workflow["jobs"]["retrain"]["env"]
    for name in ("DVC_REMOTE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name] == f"${{{{ secrets.{name} }}}}"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    text = WORKFLOW.read_text()
    # Secrets reach scripts through the environment only, never pasted into the script text.
    for step in _steps(workflow):
        assert "secrets." not in step.get("run", ""), step.get("name")
    assert text.count("secrets.") >= 8


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_missing_secrets_stop_the_job(workflow: dict[Any, Any], tmp_path: Path) -> None:
    script = _script(workflow, "Check the required secrets")
    result = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "DVC_REMOTE_URL": "s3://b/p"},
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "::error::repository secrets not set: MLFLOW_TRACKING_URI" in result.stdout
    ok = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=tmp_path,
                        env={"PATH": "/usr/bin:/bin", "DVC_REMOTE_URL": "s3://b/p",
                             "MLFLOW_TRACKING_URI": "https://mlflow.example.com"})
    assert ok.returncode == 0


@needs_bash
@pytest.mark.parametrize(("log", "outcome"), [
    ("2026-01-05T03:17:02+00:00 [pid 7] start: cycle in /w with params.yaml\n"
     "2026-01-05T03:19:40+00:00 [pid 7] outcome: promoted version 4 (test_accuracy 0.8512 > "
     "champion version 3 0.8500)\n",
     "outcome: promoted version 4 (test_accuracy 0.8512 > champion version 3 0.8500)"),
    ("2026-01-05T03:17:02+00:00 [pid 7] start: cycle in /w with params.yaml\n"
     "2026-01-05T03:17:09+00:00 [pid 7] step 'download' failed: exited with code 1 (its output "
     "is above). The champion is untouched. Log: /w/logs/retrain.log\n",
     "step 'download' failed: exited with code 1 (its output is above). The champion is "
     "untouched. Log: /w/logs/retrain.log"),
    (None, "no outcome (see the job log)"),
])
def test_outcome_reaches_the_summary_and_the_commit_message(
    workflow: dict[Any, Any], tmp_path: Path, log: str | None, outcome: str
) -> None:
    if log is not None:
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "retrain.log").write_text(log)
    github_env, summary = tmp_path / "github_env", tmp_path / "summary.md"
    result = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", _script(workflow, "Report the outcome")], cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "GITHUB_ENV": str(github_env),
             "GITHUB_STEP_SUMMARY": str(summary)},
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert github_env.read_text() == f"OUTCOME={outcome}\n"
    assert summary.read_text() == f"### Retraining: {outcome}\n"
    message = subprocess.run(["bash", "-c", 'echo "Retrain: ${OUTCOME#outcome: }"'],
                             env={"OUTCOME": outcome}, capture_output=True, text=True).stdout
    assert message.startswith("Retrain: ") and "outcome:" not in message


# --- CI on pushes and pull requests (.github/workflows/ci.yml) and pre-commit -----------------

CI = REPO_ROOT / ".github" / "workflows" / "ci.yml"


@pytest.fixture(scope="module")
def ci() -> dict[Any, Any]:
    return yaml.safe_load(CI.read_text())


def _ci_steps(ci: dict[Any, Any]) -> list[dict[str, Any]]:
    return ci["jobs"]["test"]["steps"]


def test_ci_runs_on_every_push_and_pull_request(ci: dict[Any, Any]) -> None:
    triggers = _triggers(ci)
    assert "push" in triggers and "pull_request" in triggers
    assert ci["permissions"] == {"contents": "read"}


def test_ci_matrix_is_python_311_to_313_as_strings(ci: dict[Any, Any]) -> None:
    strategy = ci["jobs"]["test"]["strategy"]
    assert strategy["matrix"]["python"] == ["3.11", "3.12", "3.13"]
    assert strategy["fail-fast"] is False
    [python] = [step for step in _ci_steps(ci)
                if step.get("uses", "").startswith("actions/setup-python")]
    assert python["with"]["python-version"] == "${{ matrix.python }}"
    assert ci["jobs"]["test"]["env"]["UV_PYTHON_DOWNLOADS"] == "never"
    setup = _index(_ci_steps(ci), r"^make setup")
    assert "PYTHON_VERSION=${{ matrix.python }}" in _ci_steps(ci)[setup]["run"]


def test_ci_caches_uv_and_the_archives(ci: dict[Any, Any]) -> None:
    steps = _ci_steps(ci)
    [uv] = [step for step in steps if step.get("uses", "").startswith("astral-sh/setup-uv")]
    assert uv["with"]["enable-cache"] is True and uv["with"]["cache-dependency-glob"] == "uv.lock"
    [cache] = [step for step in steps if step.get("uses", "").startswith("actions/cache")]
    assert cache["with"]["path"] == "data/raw"
    assert all(re.fullmatch(r"[\w-]+/[\w-]+@v\d+", step["uses"])
               for step in steps if "uses" in step)


def test_ci_lints_then_tests_with_the_real_data(ci: dict[Any, Any]) -> None:
    steps = _ci_steps(ci)
    order = [_index(steps, pattern) for pattern in (
        r"^make setup", r"^make lint$", r"pipeline\.stages\.download$", r"make test$")]
    assert order == sorted(order), "setup, lint, fetch the archives, then test"
    # The archives come from the official mirrors (no FMNIST_MIRROR when fetching) ...
    fetch = steps[order[2]]
    assert "FMNIST_MIRROR" not in fetch["run"] and "FMNIST_MIRROR" not in fetch.get("env", {})
    # ... and the test step points the real-data tests at them.
    assert 'FMNIST_MIRROR="$GITHUB_WORKSPACE/data/raw"' in steps[order[3]]["run"]


def test_pre_commit_runs_ruff_at_the_locked_version() -> None:
    config = yaml.safe_load((REPO_ROOT / ".pre-commit-config.yaml").read_text())
    [repo] = config["repos"]
    assert repo["repo"] == "https://github.com/astral-sh/ruff-pre-commit"
    assert [hook["id"] for hook in repo["hooks"]] == ["ruff-check"]
    lock = (REPO_ROOT / "uv.lock").read_text()
    locked = re.search(r'name = "ruff"\nversion = "([^"]+)"', lock).group(1)
    assert repo["rev"] == f"v{locked}"
