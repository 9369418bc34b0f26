"""Checks on the real Fashion-MNIST archives, when a local copy exists.

Looked for in $FMNIST_MIRROR (a directory or file:// URL), then in `../shared/fashion-mnist`
next to the repository. Skipped otherwise: this test never downloads anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.files import md5sum
from pipeline.core.labelled_images import load_extra
from pipeline.core.split import build_manifest, load_official, make_split, write_split
from pipeline.support import config
from pipeline.support.workspace import mirror_directory
from tests.synthetic import REPO_ROOT

pytestmark = pytest.mark.real_data



def _candidates() -> list[Path]:
    found = mirror_directory(REPO_ROOT)  # the download stage's own rule
    return [found] if found is not None else []


@pytest.fixture(scope="module")
def data_config() -> config.DataConfig:
    return config.load(REPO_ROOT / "params.yaml").data


@pytest.fixture(scope="module")
def real_dir(data_config: config.DataConfig) -> Path:
    names = [spec.name for spec in data_config.files.values()]
    for directory in _candidates():
        if all((directory / name).is_file() for name in names):
            return directory
    pytest.skip("real Fashion-MNIST archives not found in FMNIST_MIRROR (a directory or "
                "file:// URL) nor in ../shared/fashion-mnist beside the checkout")


def test_checksums_match_the_configuration(real_dir: Path,
                                           data_config: config.DataConfig) -> None:
    for spec in data_config.files.values():
        assert md5sum(real_dir / spec.name) == spec.md5, spec.name


def test_split_of_the_real_data(real_dir: Path, data_config: config.DataConfig,
                                tmp_path: Path) -> None:
    official = load_official({key: real_dir / spec.name
                              for key, spec in data_config.files.items()})
    assert official["train_images"].shape == (60_000, 28, 28)
    assert official["test_images"].shape == (10_000, 28, 28)
    np.testing.assert_array_equal(np.bincount(official["train_labels"]), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(official["test_labels"]), [1000] * 10)

    result = make_split(official, data_config.val_size, data_config.seed)
    counts = {split: result.counts(split) for split in ("train", "val", "test")}
    np.testing.assert_array_equal(counts["train"] + counts["val"], [6000] * 10)
    np.testing.assert_array_equal(counts["val"], [1000] * 10)
    np.testing.assert_array_equal(counts["test"], [1000] * 10)
    inputs = {key: {"name": s.name, "md5": s.md5} for key, s in data_config.files.items()}
    manifest = build_manifest(result, data_config.class_names, data_config.val_size,
                              data_config.seed, inputs,
                              load_extra(tmp_path / "extra", data_config.class_names).content_hash)
    written = write_split(tmp_path, result, manifest)
    assert [p.name for p in written] == ["train.npz", "val.npz", "test.npz", "manifest.json"]
    assert manifest["totals"] == {"train": 50_000, "val": 10_000, "test": 10_000}
    with np.load(tmp_path / "val.npz") as val:
        assert val["X"].shape == (10_000, 784) and val["X"].dtype == np.uint8
