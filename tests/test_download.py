"""The download stage against real local HTTP servers, local directories and file:// URLs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.files import md5sum
from pipeline.stages import download
from tests.conftest import Archives, Project, Route

NAMES = [
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
]


def _serve(archives: Archives, **modes: Route) -> dict[str, Route]:
    """Routes for the four archives, served correctly unless `modes` says otherwise."""
    routes = {spec.name: Route(archives.bytes_of(key)) for key, spec in archives.specs.items()}
    for key, route in modes.items():
        name = archives.specs[key].name
        routes[name] = Route(route.body or archives.bytes_of(key), route.mode, route.status,
                             route.missing, route.delay)
    return routes


def _corrupted(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def _run(project: Project, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = download.main(["--params", str(project.params)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_verified(project: Project, names: list[str] = NAMES) -> None:
    assert sorted(os.listdir(project.raw_dir)) == sorted(names)  # and no temporary files
    for spec in project.archives.specs.values():
        if spec.name in names:
            assert md5sum(project.raw_dir / spec.name) == spec.md5


# --- mirror list --------------------------------------------------------------------------


def test_mirror_urls_with_and_without_trailing_slash() -> None:
    assert download.source_for("http://h/a/", "f.gz") == "http://h/a/f.gz"
    assert download.source_for("http://h/a", "f.gz") == "http://h/a/f.gz"
    assert download.source_for("file:///srv/m//", "f.gz") == "file:///srv/m/f.gz"
    assert download.source_for("/srv/m/", "f.gz") == "/srv/m/f.gz"
    assert download.source_for("/srv/m", "f.gz") == "/srv/m/f.gz"


def test_environment_mirror_goes_first_and_relative_paths_become_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mirrors = download.mirrors_to_try(["http://a/", "rel/dir", "http://a/"], "local/copy")
    assert mirrors == [str(tmp_path / "local" / "copy"), "http://a/", str(tmp_path / "rel/dir")]
    assert download.mirrors_to_try(["http://a/"], "") == ["http://a/"]
    assert download.mirrors_to_try(["http://a/"], "file:///x") == ["file:///x", "http://a/"]


# --- successful downloads -------------------------------------------------------------------


def test_fetches_from_a_good_http_mirror_then_keeps_the_files(
        project: Project, http_mirror, capsys: pytest.CaptureFixture) -> None:
    mirror = http_mirror(_serve(project.archives))
    project.configure(mirrors=[mirror.url])
    code, out, err = _run(project, capsys)
    assert code == 0, err
    _assert_verified(project)
    assert out.count(f"from {mirror.url}") == 4 and "MD5 OK" in out
    assert sorted(mirror.requests) == sorted(NAMES)

    code, out, _ = _run(project, capsys)
    assert code == 0
    assert out.count("already present with the right MD5, not fetched again") == 4
    assert len(mirror.requests) == 4  # nothing fetched the second time


def test_file_with_wrong_checksum_is_fetched_again(
        project: Project, http_mirror, capsys: pytest.CaptureFixture) -> None:
    mirror = http_mirror(_serve(project.archives))
    project.configure(mirrors=[mirror.url])
    project.fill_raw()
    (project.raw_dir / NAMES[1]).write_bytes(b"stale")
    code, _, err = _run(project, capsys)
    assert code == 0
    assert f"{NAMES[1]}: present but its MD5 is" in err
    assert mirror.requests == [NAMES[1]]
    _assert_verified(project)


def test_corrupted_file_falls_through_to_the_next_mirror(
        project: Project, http_mirror, capsys: pytest.CaptureFixture) -> None:
    bad = http_mirror(_serve(project.archives, train_images=Route(
        _corrupted(project.archives.bytes_of("train_images")))))
    good = http_mirror(_serve(project.archives))
    project.configure(mirrors=[bad.url, good.url], retries=2, backoff=0.01)
    code, out, err = _run(project, capsys)
    assert code == 0, err
    _assert_verified(project)
    assert bad.count(NAMES[0]) == 2 and good.requests == [NAMES[0]]
    assert f"{NAMES[0]}: fetched" in out and f"from {good.url}{NAMES[0]}" in out
    expected = project.archives.specs["train_images"].md5
    assert f"{bad.url}{NAMES[0]} failed: MD5 mismatch: expected {expected}, got" in err


@pytest.mark.parametrize(("route", "reason"), [
    (Route(mode="drop"), "connection closed early: received"),
    (Route(mode="reset"), "connection broken after"),
    (Route(mode="status", status=503), "HTTP 503"),
])
def test_broken_transfers_fall_through(project: Project, http_mirror,
                                       capsys: pytest.CaptureFixture, route: Route,
                                       reason: str) -> None:
    bad = http_mirror(_serve(project.archives, test_images=route))
    good = http_mirror(_serve(project.archives))
    project.configure(mirrors=[bad.url, good.url], retries=2, backoff=0.0)
    code, _, err = _run(project, capsys)
    assert code == 0, err
    _assert_verified(project)
    assert bad.count(NAMES[2]) == 2  # transient: retried
    assert reason in err


def test_not_found_is_not_retried(project: Project, http_mirror,
                                  capsys: pytest.CaptureFixture) -> None:
    routes = _serve(project.archives)
    del routes[NAMES[3]]
    bad = http_mirror(routes)
    good = http_mirror(_serve(project.archives))
    project.configure(mirrors=[bad.url, good.url], retries=3, backoff=5.0)
    code, _, err = _run(project, capsys)
    assert code == 0
    assert bad.count(NAMES[3]) == 1 and good.requests == [NAMES[3]]
    assert "HTTP 404 Not Found" in err


def test_retries_back_off_exponentially(project: Project, http_mirror,
                                        capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    server = http_mirror(_serve(project.archives, train_labels=Route(mode="status", status=500)))
    project.configure(mirrors=[server.url], retries=4, backoff=0.5)
    code, _, err = _run(project, capsys)
    assert code == 1
    assert sleeps == [0.5, 1.0, 2.0]
    assert server.count(NAMES[1]) == 4
    assert "HTTP 500 Internal Server Error (4 attempts)" in err


def test_timeout(project: Project, http_mirror, capsys: pytest.CaptureFixture) -> None:
    stall = http_mirror(_serve(project.archives, test_labels=Route(mode="stall", delay=2.0)))
    good = http_mirror(_serve(project.archives))
    project.configure(mirrors=[stall.url, good.url], timeout=0.3)
    code, _, err = _run(project, capsys)
    assert code == 0
    assert "timed out after 0.3 s" in err
    _assert_verified(project)


# --- FMNIST_MIRROR --------------------------------------------------------------------------


def test_environment_mirror_as_relative_directory(
        project: Project, http_mirror, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    configured = http_mirror({})  # would answer 404: must not even be asked
    project.configure(mirrors=[configured.url])
    shutil.copytree(project.archives.directory, project.root / "copy")
    monkeypatch.chdir(project.root)
    monkeypatch.setenv("FMNIST_MIRROR", "copy/")
    code, out, _ = _run(project, capsys)
    assert code == 0
    _assert_verified(project)
    assert configured.requests == []
    assert f"from {project.root / 'copy' / NAMES[0]}" in out


def test_environment_mirror_as_file_url(project: Project, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    project.configure(mirrors=["http://127.0.0.1:9/"])  # discard port: nothing listens
    monkeypatch.setenv("FMNIST_MIRROR", project.archives.directory.as_uri())
    code, _, err = _run(project, capsys)
    assert code == 0, err
    _assert_verified(project)


# --- failures -------------------------------------------------------------------------------


def test_all_mirrors_failing(project: Project, http_mirror, capsys: pytest.CaptureFixture,
                             tmp_path: Path) -> None:
    archives = project.archives
    corrupt = http_mirror(_serve(archives, **{
        key: Route(_corrupted(archives.bytes_of(key))) for key in archives.specs
    }))
    dropping = http_mirror(_serve(archives, **{key: Route(mode="drop") for key in archives.specs}))
    missing = http_mirror({})
    empty_dir = tmp_path / "empty-mirror"
    empty_dir.mkdir()
    project.configure(mirrors=[missing.url, corrupt.url, dropping.url, str(empty_dir)],
                      retries=2, backoff=0.0)
    code, out, err = _run(project, capsys)
    assert code == 1
    assert "download: error: could not fetch 4 of 4 files into" in err
    for spec in archives.specs.values():
        assert f"{spec.name} (expected MD5 {spec.md5}):" in err
        assert f"  - {missing.url}{spec.name}: HTTP 404 Not Found\n" in err
        assert f"  - {corrupt.url}{spec.name}: MD5 mismatch: expected {spec.md5}, got " in err
        assert f"  - {dropping.url}{spec.name}: connection closed early: received " in err
        assert f"  - {empty_dir / spec.name}: missing local file\n" in err
    assert "Traceback" not in err and "fetched" not in out
    assert not project.raw_dir.exists()  # not even an empty directory is left
    assert not (project.root / "data").exists()


def test_partial_failure_keeps_verified_files(project: Project, http_mirror,
                                              capsys: pytest.CaptureFixture) -> None:
    routes = _serve(project.archives)
    del routes[NAMES[0]]
    server = http_mirror(routes)
    project.configure(mirrors=[server.url])
    code, _, err = _run(project, capsys)
    assert code == 1
    assert "could not fetch 1 of 4 files" in err and f"{NAMES[0]} (expected MD5" in err
    _assert_verified(project, NAMES[1:])


def test_leftover_temporary_files_are_removed(project: Project,
                                              capsys: pytest.CaptureFixture) -> None:
    project.fill_raw()
    leftover = project.raw_dir / f".{NAMES[0]}.deadbeef.tmp"
    leftover.write_bytes(b"killed half-way")
    (project.raw_dir / "README").write_text("not ours")
    assert _run(project, capsys)[0] == 0
    assert not leftover.exists() and (project.raw_dir / "README").exists()


def test_unsupported_scheme(project: Project, capsys: pytest.CaptureFixture) -> None:
    project.configure(mirrors=["ftp://example.invalid/"])
    code, _, err = _run(project, capsys)
    assert code == 1 and "unsupported URL scheme 'ftp'" in err


def test_command_line_exit_code_and_clean_error(project: Project) -> None:
    project.configure(mirrors=[str(project.root / "nowhere")])
    env = {k: v for k, v in os.environ.items() if k != "FMNIST_MIRROR"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.download", "--params", "params.yaml"],
        cwd=project.root, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "missing local file" in result.stderr and "Traceback" not in result.stderr
    assert not project.raw_dir.exists()

    env["FMNIST_MIRROR"] = str(project.archives.directory)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.download"], cwd=project.root, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    _assert_verified(project)
