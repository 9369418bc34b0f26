"""The model card of a registered version: what it was trained on, how it scores, why it was (not)
promoted and how to make it again.

The register stage sets it as the version's description (the MLflow UI renders it as Markdown)
and logs it as the run's artifact `model_card.md`. `build_card` is a pure function of `Card`;
`card_for_run` gathers a `Card` from the files the stages wrote (the split manifest, the
evaluation tables, dvc.lock) and the run. A file that is missing leaves its section saying so.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARTIFACT = "model_card.md"
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
SCORES = ("accuracy", "f1_macro", "log_loss")
# dvc.lock outputs the card lists: the data, the split and the model file.
LOCKED_OUTPUTS = ("data/raw", "data/split", "models/model.skops")


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if total <= 0:
        return math.nan, math.nan
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Confusion:
    actual: str
    predicted: str
    count: int
    share_of_actual: float


@dataclass(frozen=True)
class Card:
    """Everything the card says; empty mappings and lists read as "not recorded"."""

    model_name: str
    version: str
    run_id: str
    run_name: str
    model_sha256: str
    class_names: Sequence[str]
    archives: Mapping[str, tuple[str, str]]  # config key -> (file name, MD5)
    extra_per_class: Mapping[str, int]  # class -> extra images (train + validation)
    split_sizes: Mapping[str, int]  # split -> images
    data_digests: Mapping[str, str]  # e.g. split_manifest_md5 -> value
    params: Mapping[str, Any]
    scores: Mapping[str, Mapping[str, float]]  # "test" / "val" -> metric -> value
    per_class_accuracy: Mapping[str, tuple[float, int]]  # class -> (accuracy, images), test
    top_confusions: Sequence[Confusion]
    promotion: str  # the register stage's decision, with its statistics when it has them
    git_commit: str
    git_dirty: bool
    locked: Mapping[str, str] = field(default_factory=dict)  # dvc.lock output -> hash
    command: str = "dvc repro"


def _number(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _score_rows(card: Card) -> list[list[str]]:
    rows = []
    for split, label in (("test", "test"), ("val", "validation")):
        scores, n = card.scores.get(split, {}), card.split_sizes.get(split, 0)
        for metric in SCORES:
            if metric not in scores:
                continue
            value, interval = scores[metric], "n/a"
            if metric == "accuracy" and n:
                low, high = wilson_interval(round(value * n), n)
                interval = f"[{low:.4f}, {high:.4f}]"
            rows.append([label, metric, _number(value), interval, f"{n:,}" if n else "n/a"])
    return rows


def build_card(card: Card) -> str:
    """The Markdown card of one version."""
    lines = [f"# {card.model_name} version {card.version}", "",
             f"Softmax regression on Fashion-MNIST, run `{card.run_name}` ({card.run_id}).",
             f"Model file SHA-256 (reproducible skops form, tag `model_sha256`): "
             f"`{card.model_sha256}`; every load checks it.", "", "## Data", ""]
    if card.archives:
        lines += _table(["archive", "MD5"], [[f"`{name}`", f"`{md5}`"]
                                             for name, md5 in card.archives.values()])
    extra_total = sum(card.extra_per_class.values())
    lines += ["", f"Extra labelled images: {extra_total:,}"
              + (" (" + ", ".join(f"{name}: {count}" for name, count in
                                  card.extra_per_class.items() if count) + ")"
                 if extra_total else "") + ".",
              "Split sizes: " + (", ".join(f"{split} {n:,}" for split, n in
                                           card.split_sizes.items()) or "not recorded") + "."]
    lines += [f"- {key}: `{value}`" for key, value in card.data_digests.items()]
    lines += ["", "## Parameters", ""]
    lines += _table(["parameter", "value"], [[f"`{key}`", f"`{value}`"]
                                            for key, value in card.params.items()])
    lines += ["", "## Scores", "",
              "95% intervals: Wilson's score interval for accuracy (images scored "
              "independently); none is given for F1 and log loss.", ""]
    lines += _table(["split", "metric", "value", "95% interval", "images"], _score_rows(card))
    if card.per_class_accuracy:
        lines += ["", "Per-class accuracy (test):", ""]
        lines += _table(["class", "accuracy", "images"],
                        [[name, _number(accuracy), n]
                         for name, (accuracy, n) in card.per_class_accuracy.items()])
    if card.top_confusions:
        lines += ["", "Top confusions (test):", ""]
        lines += _table(["actual", "predicted as", "images", "share of actual"],
                        [[c.actual, c.predicted, c.count, f"{c.share_of_actual:.1%}"]
                         for c in card.top_confusions])
    dirty = " (with uncommitted changes: not reproducible from the commit alone)" \
        if card.git_dirty else ""
    lines += ["", "## Promotion", "", card.promotion or "No decision recorded.",
              "", "## How to reproduce", "",
              f"Git commit `{card.git_commit}`{dirty}, then:", "", "```",
              f"git checkout {card.git_commit} && dvc pull && {card.command}", "```"]
    if card.locked:
        lines += ["", "`dvc.lock` hashes it should reproduce:", ""]
        lines += [f"- `{path}`: `{value}`" for path, value in card.locked.items()]
    lines += ["", "## Intended use and limits", "",
              f"- Classifies 28x28 grayscale images into the {len(card.class_names)} "
              f"Fashion-MNIST classes ({', '.join(card.class_names)}): centred, "
              "white-on-black product photos like Fashion-MNIST's.",
              "- Not for other images (photos of worn clothes, other sizes, colour, other "
              "categories): it always answers one of these classes, with no \"unknown\".",
              "- Its probabilities are a linear model's: use them to rank, not as calibrated "
              "certainties. The test set is reused by every registration, so its scores are "
              "slightly optimistic for the champion.",
              "- Not for decisions about people."]
    return "\n".join(lines) + "\n"


# --- Gathering a card from the stages' files -----------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


def locked_hashes(lock_file: Path, paths: Sequence[str] = LOCKED_OUTPUTS) -> dict[str, str]:
    """The MD5s dvc.lock records for these outputs (of any stage)."""
    try:
        stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    found = {}
    for stage in stages.values():
        for out in (stage or {}).get("outs", []) or []:
            if isinstance(out, dict) and out.get("path") in paths and out.get("md5"):
                found[out["path"]] = out["md5"]
    return {path: found[path] for path in paths if path in found}


def rule_description(rule: Any) -> str:
    """The promotion rule a version was judged by (`PromotionConfig`), for its card."""
    if rule.test == "none":
        test = "no significance test"
    elif rule.test == "bootstrap":
        test = f"paired bootstrap, alpha {rule.alpha}, {rule.bootstrap_samples} resamples"
    else:
        test = f"exact McNemar test, alpha {rule.alpha}"
    return f"{test}, min_improvement {rule.min_improvement}"


def card_for_run(cfg: Any, out: Any, run: Any, version: str, digest: str, promoted: bool,
                 reason: str, root: Path = Path(".")) -> str:
    """The card of `version`, registered from the MLflow run `run` (its params, metrics, tags)
    with the outputs in `out` (`pipeline.support.outputs.Outputs`)."""
    data, tags, metrics = cfg.data, run.data.tags, run.data.metrics
    manifest = _read_json(root / data.split_dir / "manifest.json")
    extra = (manifest.get("extra") or {}).get("per_class") or {}
    per_class = {row["class"]: (float(row["recall"]), int(row["support"]))
                 for row in _read_csv(out.evaluation / "per_class_test.csv")
                 if {"class", "recall", "support"} <= row.keys()}
    confusions = [Confusion(row["actual"], row["predicted"], int(row["count"]),
                            float(row["share_of_actual"]))
                  for row in _read_csv(out.evaluation / "top_confusions_test.csv")[:5]
                  if {"actual", "predicted", "count", "share_of_actual"} <= row.keys()]
    rule = cfg.mlflow.promotion
    decision = "Promoted to `champion`" if promoted else "Not promoted (alias `challenger`)"
    overrides = tags.get("hydra_overrides")
    command = f"python -m pipeline.train {overrides}" if overrides else "dvc repro"
    return build_card(Card(
        model_name=cfg.mlflow.registered_model, version=version, run_id=run.info.run_id,
        run_name=run.info.run_name or "", model_sha256=digest,
        class_names=list(data.class_names),
        archives={key: (spec.name, spec.md5) for key, spec in data.files.items()},
        extra_per_class={name: sum(counts.values()) for name, counts in extra.items()},
        split_sizes=dict(manifest.get("totals") or {}),
        data_digests={key: value for key, value in sorted(tags.items())
                      if key.startswith(("data_", "split_"))},
        params=dict(sorted(run.data.params.items())),
        scores={split: {metric: metrics[f"{split}_{metric}"] for metric in SCORES
                        if f"{split}_{metric}" in metrics} for split in ("test", "val")},
        per_class_accuracy=per_class, top_confusions=confusions,
        promotion=f"{decision} on `{rule.metric}` ({rule_description(rule)}): {reason}.",
        git_commit=tags.get("git_commit", "unknown"), git_dirty=tags.get("git_dirty") == "true",
        locked=locked_hashes(root / "dvc.lock"), command=command))
