"""The model card (issue 17): a pure function of what the register stage gathers."""

from __future__ import annotations

import pytest
import yaml
from scipy.stats import binomtest

from pipeline.support import model_card
from pipeline.support.model_card import Card, Confusion, build_card, locked_hashes, wilson_interval
from tests.synthetic import CLASS_NAMES


def _card(**changes) -> Card:
    fields = dict(
        model_name="fashion-mnist-softmax", version="7", run_id="r123", run_name="softmax-lr0.1",
        model_sha256="ab" * 32, class_names=CLASS_NAMES,
        archives={"test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79")},
        extra_per_class={"Dress": 3, "Bag": 0}, split_sizes={"train": 50000, "val": 10000,
                                                           "test": 10000},
        data_digests={"split_manifest_md5": "s1"}, params={"model.learning_rate": 0.1},
        scores={"test": {"accuracy": 0.8631, "f1_macro": 0.862, "log_loss": 0.3878},
                "val": {"accuracy": 0.8788}},
        per_class_accuracy={"Shirt": (0.62, 1000), "Trouser": (0.96, 1000)},
        top_confusions=[Confusion("Shirt", "T-shirt/top", 160, 0.16)],
        promotion="Promoted to `champion` on `test_accuracy`: McNemar p = 0.001.",
        git_commit="c0ffee", git_dirty=False, locked={"models/model.skops": "9bbe98fa"},
        command="dvc repro")
    fields.update(changes)
    return Card(**fields)


@pytest.mark.parametrize(("correct", "total"), [(8631, 10000), (0, 50), (50, 50), (7, 13)])
def test_wilson_interval_is_scipys(correct: int, total: int) -> None:
    expected = binomtest(correct, total).proportion_ci(0.95, method="wilson")
    assert wilson_interval(correct, total) == pytest.approx(
        (expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize(("test", "described"), [
    ("mcnemar", "exact McNemar test, alpha 0.01, min_improvement 0.002"),
    ("bootstrap", "paired bootstrap, alpha 0.01, 500 resamples, min_improvement 0.002"),
    ("none", "no significance test, min_improvement 0.002"),
])
def test_the_card_names_the_promotion_rule_whole(test: str, described: str) -> None:
    from pipeline.support.config import PromotionConfig

    rule = PromotionConfig(metric="test_accuracy", min_improvement=0.002, test=test, alpha=0.01,
                           bootstrap_samples=500)
    assert model_card.rule_description(rule) == described


def test_the_card_covers_data_parameters_scores_promotion_reproduction_and_limits() -> None:
    text = build_card(_card())

    assert text.startswith("# fashion-mnist-softmax version 7\n")
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## Data", "## Parameters", "## Scores", "## Promotion",
                        "## How to reproduce", "## Intended use and limits"]
    assert "| `t10k-images-idx3-ubyte.gz` | `bef4ecab320f06d8554ea6380940ec79` |" in text
    assert "Extra labelled images: 3 (Dress: 3)." in text
    assert "Split sizes: train 50,000, val 10,000, test 10,000." in text
    assert "| `model.learning_rate` | `0.1` |" in text
    low, high = wilson_interval(8631, 10000)
    assert f"| test | accuracy | 0.8631 | [{low:.4f}, {high:.4f}] | 10,000 |" in text
    assert "| test | log_loss | 0.3878 | n/a | 10,000 |" in text
    assert "| validation | accuracy | 0.8788 |" in text
    assert "| Shirt | 0.6200 | 1000 |" in text
    assert "| Shirt | T-shirt/top | 160 | 16.0% |" in text
    assert "McNemar p = 0.001." in text
    assert "git checkout c0ffee && dvc pull && dvc repro" in text
    assert "- `models/model.skops`: `9bbe98fa`" in text
    assert "uncommitted" not in text
    assert "Ankle boot" in text.split("## Intended use and limits")[1]


def test_a_dirty_tree_and_missing_inputs_are_said() -> None:
    text = build_card(_card(git_dirty=True, per_class_accuracy={}, top_confusions=[],
                            split_sizes={}, promotion="", extra_per_class={}))

    assert "with uncommitted changes: not reproducible from the commit alone" in text
    assert "Split sizes: not recorded." in text and "No decision recorded." in text
    assert "Extra labelled images: 0." in text
    assert "Per-class accuracy" not in text and "Top confusions" not in text
    assert "| test | accuracy | 0.8631 | n/a | n/a |" in text  # no size: no interval


def test_locked_hashes_reads_the_outputs_of_any_stage(tmp_path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "download": {"outs": [{"path": "data/raw", "md5": "d1.dir"}]},
        "train": {"outs": [{"path": "models/model.skops", "md5": "m1"},
                           {"path": "models/run.json", "md5": "x"}]}}}))

    assert locked_hashes(lock) == {"data/raw": "d1.dir", "models/model.skops": "m1"}
    assert locked_hashes(tmp_path / "missing.lock") == {}
