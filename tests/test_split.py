from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.files import md5sum
from pipeline.core.idx import write_idx
from pipeline.core.split import (
    DatasetError,
    allocate,
    check_val_size,
    load_official,
    make_split,
    split_table,
    stratified_split,
)
from pipeline.stages import split as split_stage
from pipeline.support.config import FileSpec
from tests.conftest import Project
from tests.synthetic import CLASS_NAMES, make_dataset, write_extra_folder, write_png

OUTPUTS = ("train.npz", "val.npz", "test.npz", "manifest.json")


def _official(n_train_per_class: int = 50, n_test_per_class: int = 10, seed: int = 0) -> dict:
    train = make_dataset(n_train_per_class, seed)
    test = make_dataset(n_test_per_class, seed + 1)
    return {"train_images": train[0], "train_labels": train[1],
            "test_images": test[0], "test_labels": test[1]}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as npz:
        return npz["X"], npz["y"]


def _rows(X: np.ndarray) -> list[bytes]:
    return sorted(row.tobytes() for row in X)


# --- allocation and stratification ----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 7000), min_size=1, max_size=12),
    numerator=st.integers(0, 100),
    extra=st.integers(0, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_allocate_floor_or_ceiling_and_exact_total(counts: list[int], numerator: int,
                                                   extra: int, seed: int) -> None:
    fraction = Fraction(numerator, numerator + extra + 1)
    selected = allocate(counts, fraction, np.random.default_rng(seed))
    share = [fraction * c for c in counts]
    assert all(s.numerator // s.denominator <= n <= -(-s.numerator // s.denominator)
               for s, n in zip(share, selected, strict=True))
    total = fraction * sum(counts)
    assert selected.sum() == int(total + Fraction(1, 2))  # rounded half up


def test_allocate_exact_for_the_real_proportions() -> None:
    assert allocate([6000] * 10, Fraction(10_000, 60_000)).tolist() == [1000] * 10


@settings(max_examples=50, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=0, max_size=300),
       n_val=st.integers(1, 299), seed=st.integers(0, 1000))
def test_stratified_split_partitions_within_one_image(labels: list[int], n_val: int,
                                                      seed: int) -> None:
    labels_array = np.array(labels, dtype=np.uint8)
    fraction = Fraction(n_val, 300)
    kept, chosen = stratified_split(labels_array, fraction, np.random.default_rng(seed))
    assert np.intersect1d(kept, chosen).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, chosen])), np.arange(len(labels)))
    counts = np.bincount(labels_array, minlength=10)
    for part, share in ((chosen, fraction), (kept, 1 - fraction)):
        got = np.bincount(labels_array[part], minlength=10)
        assert np.all(np.abs(got - np.array([float(share * c) for c in counts])) < 1)


# --- make_split -----------------------------------------------------------------------------


def test_every_class_within_one_image_of_its_share() -> None:
    rng = np.random.default_rng(3)
    labels = rng.choice(10, size=997, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())
    labels = labels.astype(np.uint8)
    official = _official()
    official["train_labels"] = labels
    official["train_images"] = np.zeros((997, 28, 28), np.uint8)
    result = make_split(official, val_size=211, seed=5)
    counts = np.bincount(labels, minlength=10)
    assert result.counts("val").sum() == 211 and result.counts("train").sum() == 997 - 211
    assert np.all(np.abs(result.counts("val") - counts * 211 / 997) < 1)
    assert np.all(np.abs(result.counts("train") - counts * 786 / 997) < 1)


def test_shapes_dtypes_and_test_untouched() -> None:
    official = _official()
    result = make_split(official, val_size=100, seed=1)
    for split in ("train", "val", "test"):
        X, y = result.arrays[split]["X"], result.arrays[split]["y"]
        assert X.dtype == np.uint8 and y.dtype == np.uint8
        assert X.ndim == 2 and X.shape[1] == 784 and len(X) == len(y)
    np.testing.assert_array_equal(result.arrays["test"]["X"],
                                  official["test_images"].reshape(-1, 784))
    np.testing.assert_array_equal(result.arrays["test"]["y"], official["test_labels"])
    # train + val is a reordering of the official training set, image and label together
    joined = np.concatenate([np.column_stack([result.arrays[s]["X"], result.arrays[s]["y"]])
                             for s in ("train", "val")])
    original = np.column_stack([official["train_images"].reshape(-1, 784),
                                official["train_labels"]])
    assert _rows(joined) == _rows(original)


def test_rows_are_shuffled_not_grouped_by_class() -> None:
    result = make_split(_official(), val_size=100, seed=1)
    y = result.arrays["train"]["y"]
    assert not np.all(np.diff(y.astype(int)) >= 0)


def test_same_seed_same_arrays_different_seed_different_split() -> None:
    official = _official()
    a = make_split(official, 100, seed=1)
    b = make_split(official, 100, seed=1)
    c = make_split(official, 100, seed=2)
    for split in ("train", "val"):
        np.testing.assert_array_equal(a.arrays[split]["X"], b.arrays[split]["X"])
    assert _rows(a.arrays["val"]["X"]) != _rows(c.arrays["val"]["X"])


def test_extra_images_split_with_the_same_ratio_never_into_test() -> None:
    official = _official()  # 500 training images, val_size 100: ratio 1/5
    extra_labels = np.repeat(np.arange(10, dtype=np.uint8), [10, 5, 3, 0, 0, 0, 0, 0, 0, 2])
    extra_images = np.full((20, 28, 28), 255, dtype=np.uint8)  # recognisable: all white
    without = make_split(official, 100, seed=9)
    result = make_split(official, 100, seed=9, extra_images=extra_images,
                        extra_labels=extra_labels)
    assert result.val_fraction == Fraction(1, 5)
    assert result.extra_counts["val"].tolist() == [2, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # 0.6 -> 1
    assert result.extra_counts["train"].sum() + result.extra_counts["val"].sum() == 20
    assert result.counts("val").sum() == 104  # round(20 / 5) extra
    white = np.full(784, 255, dtype=np.uint8).tobytes()
    assert white not in {row.tobytes() for row in result.arrays["test"]["X"]}
    val_rows = [r for r in _rows(result.arrays["val"]["X"]) if r != white]
    assert val_rows == _rows(without.arrays["val"]["X"])  # extras leave the official split alone
    np.testing.assert_array_equal(result.arrays["test"]["X"], without.arrays["test"]["X"])


def test_input_checks() -> None:
    official = _official()
    with pytest.raises(DatasetError, match="val_size=500 is invalid: expected between 1 and 499"):
        make_split(official, 500, seed=0)
    bad = dict(official, train_labels=official["train_labels"][:-1])
    with pytest.raises(DatasetError, match="500 images but 499 labels"):
        make_split(bad, 100, seed=0)
    labels = official["test_labels"].copy()
    labels[7] = 10
    with pytest.raises(DatasetError, match=r"1 labels outside 0..9 \(first: 10 at index 7\)"):
        make_split(dict(official, test_labels=labels), 100, seed=0)


def test_load_official_checks_kinds_and_pairs(tmp_path: Path) -> None:
    official = _official()
    paths = {}
    for key, array in official.items():
        paths[key] = tmp_path / f"{key}.gz"
        write_idx(paths[key], array)
    loaded = load_official(paths)
    for key in official:
        np.testing.assert_array_equal(loaded[key], official[key])
    write_idx(paths["test_labels"], official["test_labels"][:-2])
    with pytest.raises(DatasetError, match=r"test_images.gz / test_labels.gz: 100 images but 98"):
        load_official(paths)


def test_summary_table() -> None:
    extra = np.zeros((4, 28, 28), np.uint8)
    result = make_split(_official(), 100, 0, extra, np.array([0, 0, 0, 9], np.uint8))
    table = split_table(result, CLASS_NAMES)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "train", "val", "test"]
    assert lines[1].startswith("T-shirt/top") and "extra" in lines[1]
    assert lines[-1].split()[:2] == ["total", "403"]


# --- the stage ------------------------------------------------------------------------------


def _run_stage(project: Project, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = split_stage.main(["--params", str(project.params)])
    out, err = capsys.readouterr()
    return code, out, err


def test_stage_writes_the_outputs_and_manifest(project: Project,
                                               capsys: pytest.CaptureFixture) -> None:
    project.fill_raw()
    write_extra_folder(project.extra_dir, {0: 5, "9": 3})
    code, out, err = _run_stage(project, capsys)
    assert code == 0, err
    assert sorted(p.name for p in project.split_dir.iterdir()) == sorted(OUTPUTS)
    assert "total" in out and "val_size=100, seed=42, 8 extra images" in out
    X, y = _load(project.split_dir / "train.npz")
    assert X.shape[1] == 784 and X.dtype == np.uint8 and y.dtype == np.uint8
    manifest = json.loads((project.split_dir / "manifest.json").read_text())
    assert manifest["val_size"] == 100 and manifest["seed"] == 42
    assert manifest["class_names"] == CLASS_NAMES
    assert manifest["totals"] == {"train": 406, "val": 102, "test": 100}
    assert manifest["counts"]["val"]["T-shirt/top"] == 11
    assert manifest["counts"]["test"] == dict.fromkeys(CLASS_NAMES, 10)
    assert manifest["extra"]["total"] == 8
    assert manifest["extra"]["per_class"]["T-shirt/top"] == {"train": 4, "val": 1}
    assert len(manifest["extra"]["content_hash"]) == 64
    for key, spec in project.archives.specs.items():
        assert manifest["inputs"][key] == {"name": spec.name, "md5": spec.md5}
    for split in ("train", "val", "test"):
        assert sum(manifest["counts"][split].values()) == len(_load(
            project.split_dir / f"{split}.npz")[1])


def test_a_split_folder_that_cannot_be_written_is_one_line(
        project: Project, capsys: pytest.CaptureFixture) -> None:
    project.fill_raw()
    project.configure(split_dir="/proc/no-such-folder/split")  # cannot be created, even by root
    code, out, err = _run_stage(project, capsys)
    assert code == 1 and err.startswith("split: error: ") and "/proc/no-such-folder" in err
    assert len(err.splitlines()) == 1, err


def test_stage_outputs_are_byte_identical_across_runs_and_places(
        tmp_path: Path, project: Project, capsys: pytest.CaptureFixture) -> None:
    project.fill_raw()
    write_extra_folder(project.extra_dir, {1: 4, 2: 3})
    assert _run_stage(project, capsys)[0] == 0
    first = {name: md5sum(project.split_dir / name) for name in OUTPUTS}
    shutil.rmtree(project.split_dir)
    assert _run_stage(project, capsys)[0] == 0
    assert {name: md5sum(project.split_dir / name) for name in OUTPUTS} == first
    # A copy of the project elsewhere gives the same bytes: no paths or times in the outputs.
    other = Project(tmp_path / "elsewhere", tmp_path / "elsewhere" / "params.yaml",
                    project.archives)
    shutil.copytree(project.root / "data" / "extra", other.extra_dir)
    other.fill_raw()
    other.configure()
    assert _run_stage(other, capsys)[0] == 0
    assert {name: md5sum(other.split_dir / name) for name in OUTPUTS} == first


def test_stage_different_seed_gives_a_different_split(project: Project,
                                                      capsys: pytest.CaptureFixture) -> None:
    project.fill_raw()
    assert _run_stage(project, capsys)[0] == 0
    val_42 = _rows(_load(project.split_dir / "val.npz")[0])
    project.configure(seed=43)
    assert _run_stage(project, capsys)[0] == 0
    assert _rows(_load(project.split_dir / "val.npz")[0]) != val_42
    manifest = json.loads((project.split_dir / "manifest.json").read_text())
    assert manifest["seed"] == 43


def test_stage_missing_raw_file(project: Project, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run_stage(project, capsys)
    assert code == 1
    assert "train-images-idx3-ubyte.gz: not found; run `python -m pipeline.stages.download`" in err
    assert "Traceback" not in err and not project.split_dir.exists()


def test_stage_refuses_raw_file_with_another_md5(project: Project,
                                                 capsys: pytest.CaptureFixture) -> None:
    project.fill_raw()
    write_idx(project.raw_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(100, np.uint8))
    code, _, err = _run_stage(project, capsys)
    assert code == 1
    assert "t10k-labels-idx1-ubyte.gz: MD5 is" in err
    assert f"expected {project.archives.specs['test_labels'].md5}" in err


def test_stage_reports_corrupt_archive_and_bad_extras(project: Project,
                                                      capsys: pytest.CaptureFixture) -> None:
    project.fill_raw()
    labels = project.raw_dir / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-10])
    project.configure(files={
        key: FileSpec(spec.name, md5sum(project.raw_dir / spec.name))
        for key, spec in project.archives.specs.items()
    })
    code, _, err = _run_stage(project, capsys)
    assert code == 1 and "t10k-labels-idx1-ubyte.gz: truncated gzip stream" in err

    project.fill_raw()
    project.configure()
    write_extra_folder(project.extra_dir, {"1": 1})
    write_png(project.extra_dir / "boots" / "x.png", np.zeros((28, 28), np.uint8))
    code, _, err = _run_stage(project, capsys)
    assert code == 1 and "unknown class folder 'boots'" in err
    assert "Traceback" not in err and not project.split_dir.exists()


def test_stage_bad_params(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert split_stage.main(["--params", str(tmp_path / "nope.yaml")]) == 1
    assert "parameter file not found" in capsys.readouterr().err


@pytest.mark.parametrize("val_size, valid", [(9, False), (10, True), (10_000, True),
                                             (59_990, True), (59_991, False), (59_999, False)])
def test_val_size_leaves_every_class_in_train_and_in_validation(val_size: int,
                                                                valid: bool) -> None:
    counts = [6000] * 10  # Fashion-MNIST
    if valid:
        check_val_size(counts, val_size)
    else:
        with pytest.raises(DatasetError, match=f"data.val_size={val_size} is invalid: .*"
                                               "expected between 10 and 59990"):
            check_val_size(counts, val_size)


def test_stage_refuses_official_test_images_and_relabelled_pixels_in_the_extra_folder(
        project: Project, capsys: pytest.CaptureFixture) -> None:
    """Whatever is already in data/extra (put there by hand, or before this check existed) is
    compared by pixels with the test archive and with itself; no split is written."""
    from PIL import Image

    from pipeline.core.idx import read_idx

    project.fill_raw()
    test_images = read_idx(project.raw_dir / "t10k-images-idx3-ubyte.gz", kind="images")
    write_extra_folder(project.extra_dir, {1: 2})
    leaked = write_png(project.extra_dir / "bag" / "from_test.png", test_images[13])
    image = make_dataset(1, seed=77)[0][0]
    first = write_png(project.extra_dir / "dress" / "a.png", image)
    second = project.extra_dir / "shirt" / "b.png"
    second.parent.mkdir()
    Image.fromarray(image).save(second, format="PNG", compress_level=0)  # another encoding
    assert md5sum(first) != md5sum(second)

    code, _, err = _run_stage(project, capsys)

    assert code == 1 and "Traceback" not in err
    assert "3 problems with the extra images" in err
    assert f"{leaked}: its pixels equal official test image #13 of t10k-images-idx3-ubyte.gz" \
        in err
    assert f"{first}: labelled 'Dress', but the same pixels are labelled otherwise at " \
           f"{second} ('Shirt')" in err
    assert f"{second}: labelled 'Shirt', but the same pixels are labelled otherwise at " \
           f"{first} ('Dress')" in err
    assert not project.split_dir.exists()
