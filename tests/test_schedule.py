"""The schedulers: the cron entry (through a fake `crontab` on a temporary file; the real one,
where installed, is only ever given a line it refuses) and the systemd user units (parsed,
rendered and, where systemd-analyze exists, verified by systemd itself)."""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.commands import schedule
from pipeline.support import scheduling
from pipeline.support.scheduling import systemd

FAKE_CRONTAB = """\
#!/bin/sh
# crontab -l / crontab - on the file $FAKE_CRONTAB_FILE, with the real one's answers. Each call is
# appended to $FAKE_CRONTAB_CALLS; with $FAKE_CRONTAB_REFUSE set, `crontab -` prints it and
# installs nothing, as the real one does with a line it cannot parse.
echo "crontab $*" >> "$FAKE_CRONTAB_CALLS"
case "$1" in
  -l) if [ -f "$FAKE_CRONTAB_FILE" ]; then cat "$FAKE_CRONTAB_FILE"
      else echo "no crontab for $(id -un)" >&2; exit 1; fi ;;
  -)  if [ -n "$FAKE_CRONTAB_REFUSE" ]; then printf '%s\\n' "$FAKE_CRONTAB_REFUSE" >&2; exit 1; fi
      content=$(cat; echo x); content=${content%x}
      case "$content" in *"
") ;; *) echo "new crontab file is missing newline before EOF, can't install." >&2; exit 1 ;;
      esac
      printf '%s' "$content" > "$FAKE_CRONTAB_FILE" ;;
  *)  echo "usage: crontab [-l | -]" >&2; exit 2 ;;
esac
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


@pytest.fixture
def crontab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file behind a fake `crontab` command that CRONTAB points at (absent: no crontab)."""
    script = tmp_path / "bin" / "crontab"
    script.parent.mkdir()
    script.write_text(FAKE_CRONTAB)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    table = tmp_path / "crontab.txt"
    monkeypatch.setenv("CRONTAB", str(script))
    monkeypatch.setenv("FAKE_CRONTAB_FILE", str(table))
    monkeypatch.setenv("FAKE_CRONTAB_CALLS", str(tmp_path / "crontab-calls.txt"))
    monkeypatch.delenv("FAKE_CRONTAB_REFUSE", raising=False)
    return table


def _crontab_calls(table: Path) -> list[str]:
    calls = table.parent / "crontab-calls.txt"
    return calls.read_text().splitlines() if calls.exists() else []


def _schedule(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = schedule.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _ours(table: Path, repo: Path) -> list[str]:
    return [line for line in table.read_text().splitlines() if not line.startswith("#")
            and line.endswith(f"# fashion-mnist-retrain:{repo.resolve()}")]


# --- Cron expressions -----------------------------------------------------------------------


def test_presets_map_to_their_cron_expressions_off_the_hour() -> None:
    assert {every: schedule.cron_schedule(every) for every in schedule.PRESETS} == {
        "weekly": "17 3 * * 1", "daily": "17 3 * * *", "hourly": "17 * * * *"}
    assert schedule.DEFAULT_EVERY == "weekly"
    for every, (cron, _) in schedule.PRESETS.items():
        assert cron.split()[0] not in ("0", "00"), every


@pytest.mark.parametrize(("every", "expression"), [
    ("0 */6 * * *", "0 */6 * * *"),
    ("  0   22 * *  1-5 ", "0 22 * * 1-5"),  # spacing is normalised, nothing else
    ("@weekly", "@weekly"),
    ("61 3 * * 1", "61 3 * * 1"),  # not judged here: `crontab -` does (see below)
])
def test_any_other_expression_is_left_for_crontab_to_judge(every: str, expression: str) -> None:
    assert schedule.cron_schedule(every) == expression


# --- The crontab ----------------------------------------------------------------------------


def test_install_into_an_empty_crontab(repo: Path, crontab: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    code, out, err = _schedule(capsys, "install", "--repo", str(repo))

    assert code == 0, err
    [line] = crontab.read_text().splitlines()
    assert crontab.read_text().endswith("\n")
    assert line.startswith("17 3 * * 1 cd ")
    assert (" -s setup >> logs/retrain.log 2>&1 && .venv/bin/python -m pipeline.retrain "
            "--no-wait >> logs/retrain.log 2>&1 ") in line
    assert line == _ours(crontab, repo)[0]
    assert "installed the cron entry (17 3 * * 1)" in out
    assert (repo / "logs").is_dir()
    assert _crontab_calls(crontab) == ["crontab -l", "crontab -"]


def test_install_twice_replaces_and_keeps_other_entries(
    repo: Path, tmp_path: Path, crontab: Path, capsys: pytest.CaptureFixture
) -> None:
    others = (
        "MAILTO=ops@example.com\n"
        "# a comment that mentions # fashion-mnist-retrain:" + str(repo.resolve()) + "\n"
        "0 1 * * * /usr/bin/backup\n"
        "17 3 * * 1 cd /elsewhere && make retrain # fashion-mnist-retrain:/elsewhere\n"
    )
    crontab.write_text(others)

    assert _schedule(capsys, "install", "--repo", str(repo))[0] == 0
    code, out, _ = _schedule(capsys, "install", "--repo", str(repo), "--every", "0 */6 * * *")

    assert code == 0 and "replaced the cron entry (0 */6 * * *)" in out
    lines = crontab.read_text().splitlines()
    assert lines[:4] == others.splitlines()
    assert len(lines) == 5 and lines[4].startswith("0 */6 * * * cd ")
    assert _ours(crontab, repo) == [lines[4]]


def test_install_from_a_subdirectory_finds_the_repository(
    repo: Path, crontab: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (repo / "pipeline").mkdir()
    monkeypatch.chdir(repo / "pipeline")
    assert _schedule(capsys, "install", "--every", "daily")[0] == 0
    assert _ours(crontab, repo)[0].startswith("17 3 * * * ")


def test_uninstall_removes_only_this_checkouts_entry(
    repo: Path, crontab: Path, capsys: pytest.CaptureFixture
) -> None:
    crontab.write_text("0 1 * * * /usr/bin/backup\n")
    assert _schedule(capsys, "install", "--repo", str(repo))[0] == 0

    code, out, _ = _schedule(capsys, "uninstall", "--repo", str(repo))
    assert code == 0 and "removed the cron entry" in out
    assert crontab.read_text() == "0 1 * * * /usr/bin/backup\n"

    code, out, _ = _schedule(capsys, "uninstall", "--repo", str(repo))
    assert code == 0 and "nothing to remove" in out


def test_show(repo: Path, crontab: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    units = tmp_path / "units"
    code, out, _ = _schedule(capsys, "show", "--repo", str(repo), "--dest", str(units))
    assert code == 0 and "cron: not scheduled" in out and "systemd: no timer" in out
    _schedule(capsys, "install", "--repo", str(repo), "--every", "hourly")
    code, out, _ = _schedule(capsys, "show", "--repo", str(repo), "--dest", str(units))
    assert code == 0 and "cron: scheduled (17 * * * *)" in out


def test_a_percent_sign_in_the_path_is_escaped_for_cron(
    tmp_path: Path, crontab: Path, capsys: pytest.CaptureFixture
) -> None:
    repo = tmp_path / "100% sure"
    repo.mkdir()
    (repo / "dvc.yaml").write_text("stages: {}\n")
    for _ in range(2):
        assert _schedule(capsys, "install", "--repo", str(repo))[0] == 0
    [line] = crontab.read_text().splitlines()
    assert "100\\% sure" in line and "100% sure" not in line


CRONTAB_REFUSAL = "\"-\":1: bad minute\nerrors in crontab file, can't install."  # cron 3.0


def test_a_schedule_that_crontab_refuses_leaves_the_crontab_alone(
    repo: Path, crontab: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    crontab.write_text("0 1 * * * /usr/bin/backup\n")
    monkeypatch.setenv("FAKE_CRONTAB_REFUSE", CRONTAB_REFUSAL)

    code, out, err = _schedule(capsys, "install", "--repo", str(repo), "--every", "fortnightly")

    assert code == 1 and "installed" not in out
    assert "`crontab -` refused the schedule 'fortnightly' (exit code 1)" in err
    assert "bad minute errors in crontab file, can't install." in err  # crontab's own reason
    assert "Nothing was changed" in err and "weekly, daily, hourly" in err
    assert crontab.read_text() == "0 1 * * * /usr/bin/backup\n"
    assert not (repo / "logs").exists()


@pytest.mark.parametrize("every", [
    "17 3 * * 1\n0 0 * * * rm -rf ~",  # a second crontab line
    "17 3 * * 1\n",
    "17 3 * * 1 # a comment would swallow the command",
    "",
    "   ",
])
def test_an_expression_that_is_not_one_cron_line_is_refused_before_crontab_runs(
    repo: Path, crontab: Path, capsys: pytest.CaptureFixture, every: str
) -> None:
    crontab.write_text("0 1 * * * /usr/bin/backup\n")

    code, _, err = _schedule(capsys, "install", "--repo", str(repo), "--every", every)

    assert code == 1
    assert f"--every {every!r}: expected weekly, daily, hourly or one cron expression" in err
    assert _crontab_calls(crontab) == []  # neither read nor written
    assert crontab.read_text() == "0 1 * * * /usr/bin/backup\n"


def _real_crontab_listing() -> tuple[int, str, str]:
    result = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.skipif(shutil.which("crontab") is None,
                    reason="needs the real `crontab` command (Debian/Ubuntu: apt-get install cron)")
def test_the_real_crontab_refuses_a_bad_minute_and_nothing_changes(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's own crontab, through the real command: only ever given a line it must refuse,
    so that this test can never install anything."""
    monkeypatch.delenv("CRONTAB", raising=False)
    before = _real_crontab_listing()
    if before[0] != 0 and "no crontab" not in before[2].lower():
        pytest.skip(f"`crontab -l` does not work for this user: {before[2].strip()}")

    with pytest.raises(schedule.ScheduleError) as refused:
        schedule.install(repo, "61 3 * * 1")  # minute 61

    message = str(refused.value)
    assert "`crontab -` refused the schedule '61 3 * * 1'" in message
    assert "bad minute" in message  # crontab's reason, not ours
    assert "Nothing was changed" in message
    assert _real_crontab_listing() == before
    assert not (repo / "logs").exists()


def test_without_crontab_the_error_suggests_systemd(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("CRONTAB", str(tmp_path / "no-such-crontab"))
    code, _, err = _schedule(capsys, "install", "--repo", str(repo))
    assert code == 1
    assert "not found" in err and "install-systemd" in err


def test_a_failing_crontab_is_reported(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    script = tmp_path / "crontab"
    script.write_text("#!/bin/sh\necho 'you are not allowed to use this program' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CRONTAB", str(script))
    code, _, err = _schedule(capsys, "install", "--repo", str(repo))
    assert code == 1 and "`crontab -l` failed" in err and "not allowed" in err


FAKE_PYTHON = """\
#!/bin/sh
echo "cycle run with [$*]"
exit "$(cat cycle-exit-code)"
"""


@pytest.mark.parametrize(("setup_code", "cycle_code", "log"), [
    (0, 0, "setup\ncycle run with [-m pipeline.retrain --no-wait]\n"),
    (0, 75, "setup\ncycle run with [-m pipeline.retrain --no-wait]\n"),  # not make's 2
    (1, 0, "setup\n"),  # no cycle without an up-to-date virtualenv
])
def test_the_installed_command_runs_setup_then_the_cycle_as_cron_would(
    repo: Path, crontab: Path, capsys: pytest.CaptureFixture, setup_code: int, cycle_code: int,
    log: str
) -> None:
    """Cron runs the line's command with /bin/sh, a bare PATH, from $HOME, with % unescaped."""
    (repo / "Makefile").write_text(f"setup:\n\t@echo setup; exit {setup_code}\n")
    python = repo / scheduling.VENV_PYTHON
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (repo / "cycle-exit-code").write_text(f"{cycle_code}\n")
    shutil.rmtree(repo / "logs", ignore_errors=True)
    assert _schedule(capsys, "install", "--repo", str(repo))[0] == 0
    line = _ours(crontab, repo)[0]
    command = line.split(None, 5)[5].replace("\\%", "%")

    result = subprocess.run(["/bin/sh", "-c", command], cwd=Path.home(),
                            env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
                            capture_output=True, text=True)

    assert result.returncode == (cycle_code if setup_code == 0 else 2), result.stderr
    assert (repo / "logs" / "retrain.log").read_text().replace(
        "make: *** [Makefile:2: setup] Error 1\n", "") == log


# --- systemd --------------------------------------------------------------------------------


def _units(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_unit_templates_have_what_systemd_needs() -> None:
    service = _units(systemd.TEMPLATE_DIR / "fashion-mnist-retrain.service")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["WorkingDirectory"] == "${REPO}"
    assert service["Service"]["ExecStartPre"] == "${MAKE} -s setup"
    assert service["Service"]["ExecStart"] == "${PYTHON} -m pipeline.retrain --no-wait"
    assert service["Service"]["SuccessExitStatus"] == "75"  # a cycle skipped by --no-wait
    assert service["Unit"]["Description"]
    timer = _units(systemd.TEMPLATE_DIR / "fashion-mnist-retrain.timer")
    assert timer["Timer"]["OnCalendar"] == schedule.PRESETS["weekly"][1]
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"]
    assert timer["Timer"]["Unit"] == "fashion-mnist-retrain.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_install_systemd_renders_the_units(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dest = tmp_path / "systemd" / "user"
    code, out, err = _schedule(capsys, "install-systemd", "--repo", str(repo), "--dest", str(dest))

    assert code == 0, err
    service = _units(dest / "fashion-mnist-retrain.service")
    assert service["Service"]["WorkingDirectory"] == str(repo.resolve())
    make = service["Service"]["ExecStartPre"].split()[0]
    assert Path(make).is_absolute() and os.access(make, os.X_OK)
    assert service["Service"]["ExecStart"] == (
        f"{repo.resolve()}/.venv/bin/python -m pipeline.retrain --no-wait")
    assert "$" not in (dest / "fashion-mnist-retrain.service").read_text()
    timer = _units(dest / "fashion-mnist-retrain.timer")
    assert timer["Timer"]["OnCalendar"] == "Mon *-*-* 03:17:00"
    assert ("systemctl --user daemon-reload && systemctl --user enable --now "
            "fashion-mnist-retrain.timer") in out


@pytest.mark.parametrize(("name", "word"), [
    ("plain", "{repo}/.venv/bin/python"),
    ("with space", '"{repo}/.venv/bin/python"'),
    ("100% $HOME", '"{repo}/.venv/bin/python"'),
    ('say "hi"', '"{repo}/.venv/bin/python"'),
])
def test_install_systemd_quotes_the_paths_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, word: str
) -> None:
    repo = tmp_path / name
    repo.mkdir()
    (repo / "dvc.yaml").write_text("stages: {}\n")
    dest = tmp_path / "units"
    assert _schedule(capsys, "install-systemd", "--repo", str(repo), "--dest", str(dest))[0] == 0
    service = _units(dest / "fashion-mnist-retrain.service")["Service"]
    escaped = str(repo.resolve()).replace("%", "%%").replace('"', '\\"')
    assert service["ExecStart"] == word.format(repo=escaped) + " -m pipeline.retrain --no-wait"
    assert service["WorkingDirectory"] == str(repo.resolve()).replace("%", "%%")


@pytest.mark.parametrize(("args", "calendar"), [
    (["--every", "daily"], "*-*-* 03:17:00"),
    (["--every", "hourly"], "*-*-* *:17:00"),
    (["--on-calendar", "Sat *-*-* 04:45:00"], "Sat *-*-* 04:45:00"),
])
def test_install_systemd_with_another_schedule(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], calendar: str
) -> None:
    dest = tmp_path / "units"
    assert _schedule(capsys, "install-systemd", "--repo", str(repo), "--dest", str(dest),
                     *args)[0] == 0
    timer = _units(dest / "fashion-mnist-retrain.timer")
    assert timer["Timer"]["OnCalendar"] == calendar
    assert timer["Unit"]["Description"] == f"Fashion-MNIST retraining, OnCalendar={calendar}"
    assert "Weekly" not in (dest / "fashion-mnist-retrain.timer").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", ["checkout", "check out 100% $HOME"])
def test_systemd_accepts_the_rendered_units(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    for _, calendar in schedule.PRESETS.values():
        subprocess.run(["systemd-analyze", "calendar", calendar], check=True,
                       capture_output=True)
    repo = tmp_path / name
    python = repo / scheduling.VENV_PYTHON  # verify checks that the commands are executables
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    dest = tmp_path / "units"
    assert _schedule(capsys, "install-systemd", "--repo", str(repo), "--dest", str(dest))[0] == 0
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         str(dest / "fashion-mnist-retrain.timer"), str(dest / "fashion-mnist-retrain.service")],
        capture_output=True, text=True,
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "fashion-mnist-retrain" in line]
    assert not problems, "\n".join(problems)


def test_install_systemd_refuses_a_bad_calendar(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = _schedule(capsys, "install-systemd", "--repo", str(repo), "--dest",
                             str(tmp_path / "units"), "--on-calendar", "every tuesday")
    assert code == 1 and "--on-calendar 'every tuesday'" in err
    assert not (tmp_path / "units").exists()


def test_uninstall_systemd(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dest = tmp_path / "units"
    _schedule(capsys, "install-systemd", "--repo", str(repo), "--dest", str(dest))
    wants = dest / "timers.target.wants"
    wants.mkdir()
    (wants / "fashion-mnist-retrain.timer").symlink_to(dest / "fashion-mnist-retrain.timer")

    code, out, _ = _schedule(capsys, "show", "--repo", str(repo), "--dest", str(dest))
    assert "systemd: enabled" in out
    code, _, err = _schedule(capsys, "uninstall-systemd", "--dest", str(dest))
    assert code == 1 and "systemctl --user disable --now fashion-mnist-retrain.timer" in err

    (wants / "fashion-mnist-retrain.timer").unlink()
    code, out, _ = _schedule(capsys, "uninstall-systemd", "--dest", str(dest))
    assert code == 0 and "systemctl --user daemon-reload" in out
    assert sorted(p.name for p in dest.iterdir()) == ["timers.target.wants"]


def test_the_command_line_entry_point(repo: Path, crontab: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.commands.schedule", "install"],
                            cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(_ours(crontab, repo)) == 1
