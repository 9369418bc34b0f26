"""`python -m pipeline.add_data` against a real git + DVC repository in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.commands import add_data
from pipeline.core.idx import read_idx
from pipeline.core.labelled_images import load_extra
from tests.conftest import Archives
from tests.synthetic import (
    CLASS_NAMES,
    REPO_ROOT,
    data_params,
    make_images,
    write_extra_folder,
    write_params,
    write_png,
)

DVC = str(Path(sys.executable).parent / "dvc")
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def _run(*argv: str, cwd: Path) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="session")
def repo_template(tmp_path_factory: pytest.TempPathFactory, archives: Archives) -> Path:
    """A git + DVC repository like this one: dvc.yaml, params.yaml, data.dvc of an empty folder."""
    root = tmp_path_factory.mktemp("add-data-template") / "repo"
    root.mkdir()
    _run("git", "init", "-q", cwd=root)
    _run(DVC, "init", "-q", cwd=root)
    _run(DVC, "config", "core.analytics", "false", cwd=root)
    (root / "dvc.yaml").write_text("stages: {}\n")
    write_params(root / "params.yaml", data_params(archives.specs))
    shutil.copyfile(REPO_ROOT / "data.dvc", root / "data.dvc")
    (root / "data" / "extra").mkdir(parents=True)
    (root / ".gitignore").write_text("/data/extra/\n")
    _run("git", "add", "-A", cwd=root)
    _run("git", "commit", "-qm", "init", cwd=root)
    return root


@pytest.fixture
def repo(tmp_path: Path, repo_template: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(repo_template, root, symlinks=True)
    return root


def _add(repo: Path, source: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = add_data.main([str(source), "--params", str(repo / "params.yaml")])
    out, err = capsys.readouterr()
    return code, out, err


def _tracked(repo: Path) -> dict:
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_adds_images_under_canonical_folders_and_commits_data_dvc(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "new"
    write_extra_folder(source, {"Trouser": 2, "3": 1, "Ankle boot": 1})
    before = _tracked(repo)

    code, out, err = _add(repo, source, capsys)

    assert code == 0, err
    extra = repo / "data" / "extra"
    assert sorted(_files(extra)) == ["ankle_boot/img_0000.png", "dress/img_0000.png",
                                     "trouser/img_0000.png", "trouser/img_0001.png"]
    loaded = load_extra(extra, CLASS_NAMES)
    assert sorted(loaded.labels.tolist()) == [1, 1, 3, 9]
    tracked = _tracked(repo)
    assert tracked["path"] == "data/extra" and tracked["nfiles"] == 4
    assert tracked["md5"] != before["md5"]
    assert "up to date" in _run(DVC, "status", "data.dvc", cwd=repo).lower()
    assert _run("git", "status", "--porcelain", cwd=repo).split() == ["M", "data.dvc"]
    assert "added 4 images (trouser: 2, dress: 1, ankle_boot: 1)" in out
    assert "git add data.dvc && git commit -m" in out
    assert "no DVC remote configured" in out and "\n  dvc push" not in out
    assert "img_0000.png" not in out  # a summary, not one line per image

    first = _files(extra)
    code, out, _ = _add(repo, source, capsys)  # again: everything is there already

    assert code == 0
    assert _files(extra) == first and _tracked(repo) == tracked
    assert "skipped 4 images already present (same content), e.g." in out
    assert out.count("same image as") == 1 and "added 0 images, skipped 4" in out
    assert "nothing new; data.dvc unchanged" in out and "git commit" not in out


def _copy_all(source: Path, extra: Path) -> add_data.Plan:
    plan = add_data.make_plan(source, extra, CLASS_NAMES)
    add_data.copy_all(plan.copies, extra)
    return plan


def test_a_taken_name_gets_a_new_one_and_known_content_is_skipped(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    existing = write_png(extra / "1" / "img_0000.png", make_images([1], seed=99)[0]).read_bytes()
    (extra / "trouser").mkdir()
    (extra / "trouser" / "img_0000-1.png").write_bytes(existing)
    source = tmp_path / "new"
    write_extra_folder(source, {"trouser": 1})
    (source / "trouser" / "shirt.png").write_bytes(existing)

    plan = _copy_all(source, extra)

    assert [(s.name, e.relative_to(extra).as_posix()) for s, e in plan.skipped] == [
        ("shirt.png", "1/img_0000.png")]
    assert _files(extra) == {
        "1/img_0000.png": existing, "trouser/img_0000-1.png": existing,
        "trouser/img_0000.png": (source / "trouser" / "img_0000.png").read_bytes(),
    }


def test_same_name_twice_in_the_input_gets_two_names(tmp_path: Path) -> None:
    source = tmp_path / "new"
    write_png(source / "2" / "a.png", make_images([2], seed=1)[0])
    write_png(source / "pullover" / "a.png", make_images([2], seed=2)[0])
    write_png(source / "pullover" / "b.png", make_images([2], seed=1)[0])  # same as 2/a.png

    plan = _copy_all(source, tmp_path / "extra")

    assert sorted(_files(tmp_path / "extra")) == ["pullover/a-1.png", "pullover/a.png"]
    assert [s.relative_to(source).as_posix() for s, _ in plan.skipped] == ["pullover/b.png"]


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    source, extra = tmp_path / "new", tmp_path / "extra"
    write_extra_folder(source, {6: 1})
    [copy] = add_data.make_plan(source, extra, CLASS_NAMES).copies
    write_png(copy.destination, make_images([6], seed=5)[0])  # another writer got there first
    theirs = copy.destination.read_bytes()

    [final] = add_data.copy_all([copy], extra)

    assert final.name == "img_0000-1.png" and final.read_bytes() == copy.data
    assert copy.destination.read_bytes() == theirs
    assert sorted(_files(extra)) == ["shirt/img_0000-1.png", "shirt/img_0000.png"]


def test_invalid_input_is_reported_at_once_and_nothing_is_added(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "new"
    write_extra_folder(source, {0: 2})
    write_png(source / "bag" / "big.png", np.zeros((32, 32), dtype=np.uint8))
    write_png(source / "bag" / "colour.png", np.zeros((28, 28), dtype=np.uint8), mode="RGB")
    write_png(source / "hats" / "hat.png", np.zeros((28, 28), dtype=np.uint8))
    (source / "bag" / "broken.png").write_bytes(b"not a png")
    data_dvc = (repo / "data.dvc").read_bytes()

    code, out, err = _add(repo, source, capsys)

    assert code == 1
    assert "4 problems" in err and "nothing was added" in err
    for name in ("big.png", "colour.png", "broken.png", "hats"):
        assert name in err
    assert _files(repo / "data" / "extra") == {}
    assert (repo / "data.dvc").read_bytes() == data_dvc


def test_an_image_already_labelled_otherwise_is_a_conflict(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = write_png(repo / "data" / "extra" / "bag" / "x.png", make_images([8])[0])
    source = tmp_path / "new"
    write_extra_folder(source, {8: 1})
    (source / "sandal").mkdir()
    shutil.copyfile(image, source / "sandal" / "same.png")

    code, _, err = _add(repo, source, capsys)

    assert code == 1
    assert "same.png" in err and "already labelled 'Bag'" in err and str(image) in err
    assert sorted(_files(repo / "data" / "extra")) == ["bag/x.png"]


@pytest.mark.parametrize("layout", ["empty", "missing", "inside-extra"])
def test_no_images_or_a_wrong_folder_is_refused(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture, layout: str
) -> None:
    source = {"empty": tmp_path / "empty", "missing": tmp_path / "missing",
              "inside-extra": repo / "data" / "extra"}[layout]
    if layout == "empty":
        (source / "trouser").mkdir(parents=True)
        (source / "README.md").write_text("nothing here")

    code, _, err = _add(repo, source, capsys)

    assert code == 1
    assert {"empty": "no PNG images", "missing": "no such folder",
            "inside-extra": "inside the extra folder"}[layout] in err


def test_failed_dvc_commit_keeps_the_images_and_says_how_to_finish(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with open(repo / "data.dvc", "a") as f:
        f.write("frobnicate: true\n")  # DVC refuses a .dvc file with unknown keys
    source = tmp_path / "new"
    write_extra_folder(source, {4: 2})

    code, out, err = _add(repo, source, capsys)

    assert code == 1
    assert "dvc commit -f data.dvc` failed" in err and "frobnicate" in err
    assert "images are in place" in err and "dvc commit -f data.dvc" in err.splitlines()[-1]
    assert sorted(_files(repo / "data" / "extra")) == ["coat/img_0000.png", "coat/img_0001.png"]


def test_command_line_with_a_remote_says_to_push(repo: Path, tmp_path: Path) -> None:
    _run(DVC, "remote", "add", "-d", "storage", str(tmp_path / "remote"), cwd=repo)
    source = tmp_path / "new"
    write_extra_folder(source, {5: 1})

    result = subprocess.run([sys.executable, "-m", "pipeline.add_data", str(source)], cwd=repo,
                            capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert (repo / "data" / "extra" / "sandal" / "img_0000.png").is_file()
    assert result.stdout.rstrip().endswith("dvc push")


def test_a_copy_that_fails_midway_leaves_nothing_and_a_rerun_works(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "new"
    write_extra_folder(source, {"trouser": 2, "coat": 2, "shirt": 1})
    extra = repo / "data" / "extra"
    (extra / "coat").write_bytes(b"not a folder")  # the class folder cannot be created
    tracked = _tracked(repo)

    code, _, err = _add(repo, source, capsys)

    assert code == 1 and "Traceback" not in err
    assert f"to {extra / 'coat'} failed" in err and "nothing was added" in err
    assert _files(extra) == {"coat": b"not a folder"}  # trouser/ (copied first) is gone too
    assert sorted(p.name for p in extra.parent.iterdir()) == ["extra"]  # no staging folder left
    assert _tracked(repo) == tracked

    (extra / "coat").unlink()
    code, out, err = _add(repo, source, capsys)
    assert code == 0, err
    assert "added 5 images" in out and len(_files(extra)) == 5


def test_a_fifo_or_a_device_among_the_images_is_refused_at_once(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "new"
    write_extra_folder(source, {"bag": 1})
    os.mkfifo(source / "bag" / "pipe.png")
    (source / "bag" / "zero.png").symlink_to("/dev/zero")

    code, _, err = _add(repo, source, capsys)

    assert code == 1
    assert f"{source / 'bag' / 'pipe.png'}: a FIFO; only regular files are read" in err
    assert f"{source / 'bag' / 'zero.png'}: a character device" in err
    assert _files(repo / "data" / "extra") == {}


def _reencoded(path: Path, image: np.ndarray) -> Path:
    """The same pixels in another PNG encoding (no compression, a text chunk): another MD5."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-encoded")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=0, pnginfo=info)
    return path


def test_official_test_images_and_relabelled_pixels_are_refused_and_nothing_is_added(
    repo: Path, tmp_path: Path, archives: Archives, capsys: pytest.CaptureFixture
) -> None:
    """Test images decoded from the archive, and a re-encoded copy of an image under another
    label, are refused by pixels (their files' MD5s are all new); every file is named."""
    raw = repo / "data" / "raw"
    raw.mkdir(parents=True)
    test_archive = raw / archives.specs["test_images"].name
    test_archive.write_bytes(archives.bytes_of("test_images"))
    test_images = read_idx(test_archive, kind="images")
    test_labels = read_idx(archives.directory / archives.specs["test_labels"].name)
    kept = write_png(repo / "data" / "extra" / "bag" / "kept.png", make_images([8], seed=5)[0])
    data_dvc = (repo / "data.dvc").read_bytes()
    source = tmp_path / "new"
    write_extra_folder(source, {2: 2})  # fine on their own
    leaked = [write_png(source / str(test_labels[i]) / f"test_{i}.png", test_images[i])
              for i in (0, 7, 42)]
    relabelled = _reencoded(source / "coat" / "kept_as_coat.png", make_images([8], seed=5)[0])
    in_batch = make_images([3], seed=6)[0]
    batch_a = write_png(source / "dress" / "a.png", in_batch)
    batch_b = _reencoded(source / "shirt" / "b.png", in_batch)

    code, out, err = _add(repo, source, capsys)

    assert code == 1, out
    assert "nothing was added" in err and "Traceback" not in err
    for path, number in zip(leaked, (0, 7, 42), strict=True):
        assert f"{path}: its pixels equal official test image #{number} of " \
               "t10k-images-idx3-ubyte.gz" in err
    assert f"{relabelled}: the same pixels are already labelled 'Bag' at {kept}" in err
    assert f"{batch_b}: the same pixels are already labelled 'Dress' at {batch_a}" in err
    assert err.count("\n  - ") == 5
    assert _files(repo / "data" / "extra") == {"bag/kept.png": kept.read_bytes()}
    assert (repo / "data.dvc").read_bytes() == data_dvc


def test_a_reencoded_copy_with_the_same_label_is_skipped(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = make_images([4], seed=3)[0]
    kept = write_png(repo / "data" / "extra" / "coat" / "x.png", image)
    _reencoded(tmp_path / "new" / "4" / "y.png", image)

    code, out, _ = _add(repo, tmp_path / "new", capsys)

    assert code == 0
    assert f"same image as {kept}" in out and "added 0 images, skipped 1" in out
    assert "is not downloaded yet" in out  # no data/raw here: the split stage compares
