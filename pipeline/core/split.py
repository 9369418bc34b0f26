"""Stratified train/validation split of Fashion-MNIST, plus the extra labelled images.

The official training images are split into train and validation with exactly `val_size`
validation images, each class getting the floor or the ceiling of its proportional share (so
every class is within one image of its share in both splits). The official test images are kept
as they are, in their original order: they are the benchmark everyone else reports on.

Extra images go to train and validation only, never to test, with the same ratio
`val_size / n_official_train` (10,000 / 60,000 = 1/6 on the real data) and the same per-class
rounding; their total number of validation images is that ratio times their count, rounded half
up. They are split separately, from their own random stream, so adding extra images never
changes which official images are in validation.

Everything is driven by one seed through `np.random.SeedSequence`, so the same inputs and
parameters give the same arrays, and `write_split` turns them into the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_write_text, write_npz
from pipeline.core.idx import N_PIXELS, read_idx

N_CLASSES = 10
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


class DatasetError(PipelineError, ValueError):
    """Input data that cannot be split as asked; the message says which data and why."""


def check_labelled(images: np.ndarray, labels: np.ndarray, what: str,
                   n_classes: int = N_CLASSES) -> None:
    """Refuse images and labels that do not pair up or labels outside 0..n_classes-1."""
    if len(images) != len(labels):
        raise DatasetError(
            f"{what}: {len(images)} images but {len(labels)} labels; expected the same number"
        )
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
        raise DatasetError(
            f"{what}: {bad.size} labels outside 0..{n_classes - 1} "
            f"(first: {int(labels[bad[0]])} at index {int(bad[0])})"
        )


def load_official(paths: Mapping[str, str | Path]) -> dict[str, np.ndarray]:
    """Read the four official archives (keys as in the config's `data.files`) and check them."""
    arrays = {
        key: read_idx(paths[key], kind="images" if key.endswith("images") else "labels")
        for key in ("train_images", "train_labels", "test_images", "test_labels")
    }
    for part in ("train", "test"):
        check_labelled(
            arrays[f"{part}_images"], arrays[f"{part}_labels"],
            f"{Path(paths[f'{part}_images']).name} / {Path(paths[f'{part}_labels']).name}",
        )
    return arrays


def _round_half_up(value: Fraction) -> int:
    return int((2 * value.numerator + value.denominator) // (2 * value.denominator))


def allocate(counts: Sequence[int] | np.ndarray, fraction: Fraction,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """How many items of each class to select so that the total is round(fraction * total).

    Largest-remainder rounding in exact arithmetic: every class gets the floor or the ceiling
    of `fraction * count`; the leftover items go to the largest remainders, ties broken by
    `rng` (by class index without one) so that no class is systematically favoured.
    """
    counts = [int(c) for c in counts]
    quotas = [fraction * c for c in counts]
    floors = [q.numerator // q.denominator for q in quotas]
    total = _round_half_up(fraction * sum(counts))
    leftover = total - sum(floors)
    tiebreak = rng.permutation(len(counts)) if rng is not None else np.arange(len(counts))
    order = sorted(range(len(counts)), key=lambda c: (-(quotas[c] - floors[c]), tiebreak[c]))
    selected = np.array(floors, dtype=np.int64)
    for c in order[:leftover]:
        selected[c] += 1
    return selected


def check_val_size(class_counts: Sequence[int] | np.ndarray, val_size: int) -> None:
    """Every class must keep training images and get validation images, whatever the seed.

    `class_counts` are the official training images per class; `allocate` gives each class the
    floor or the ceiling of its share, so both bounds are checked. DatasetError names
    `data.val_size` and the range that works for these counts.
    """
    counts = [int(c) for c in class_counts]
    n_official = sum(counts)
    if not 0 < val_size < n_official:
        raise DatasetError(
            f"data.val_size={val_size} is invalid: expected between 1 and {n_official - 1}, "
            f"the official training set having {n_official} images"
        )
    fraction = Fraction(val_size, n_official)
    shares = [fraction * c for c in counts]
    if all(share >= 1 and c - share >= 1 for share, c in zip(shares, counts, strict=True)):
        return
    smallest = min(c for c in counts if c)
    low = -(-n_official // smallest)  # ceil: the smallest class gets at least one
    high = n_official - low
    raise DatasetError(
        f"data.val_size={val_size} is invalid: with {n_official} official training images "
        f"({smallest} in the smallest class) every class must keep training images and get "
        f"validation images; expected between {low} and {high}"
    )


def stratified_split(labels: np.ndarray, fraction: Fraction, rng: np.random.Generator,
                     n_classes: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ascending) of the kept and the selected items, selected per `allocate`."""
    labels = np.asarray(labels)
    n_selected = allocate(np.bincount(labels, minlength=n_classes), fraction, rng)
    selected = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        selected.append(rng.permutation(members)[: n_selected[c]])
    chosen = np.sort(np.concatenate(selected)) if selected else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[chosen] = False
    return np.flatnonzero(mask), chosen


@dataclass
class SplitResult:
    """The three splits as flat uint8 arrays, and where their images came from."""

    arrays: dict[str, dict[str, np.ndarray]]  # split -> {"X": (n, 784), "y": (n,)}
    extra_counts: dict[str, np.ndarray] = field(default_factory=dict)  # train/val, per class
    val_fraction: Fraction = Fraction(0)

    def counts(self, split: str, n_classes: int = N_CLASSES) -> np.ndarray:
        return np.bincount(self.arrays[split]["y"], minlength=n_classes)


def make_split(
    official: Mapping[str, np.ndarray],
    val_size: int,
    seed: int,
    extra_images: np.ndarray | None = None,
    extra_labels: np.ndarray | None = None,
    n_classes: int = N_CLASSES,
) -> SplitResult:
    """Split `official` (the dict from `load_official`) and the extras; see the module doc."""
    train_images, train_labels = official["train_images"], official["train_labels"]
    check_labelled(train_images, train_labels, "official training set", n_classes)
    check_labelled(official["test_images"], official["test_labels"], "official test set",
                   n_classes)
    n_official = len(train_labels)
    check_val_size(np.bincount(train_labels, minlength=n_classes), val_size)
    if extra_images is None or extra_labels is None:
        extra_images = np.zeros((0, 28, 28), dtype=np.uint8)
        extra_labels = np.zeros(0, dtype=np.uint8)
    check_labelled(extra_images, extra_labels, "extra images", n_classes)

    fraction = Fraction(val_size, n_official)
    official_rng, extra_rng, shuffle_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    off_train, off_val = stratified_split(train_labels, fraction, official_rng, n_classes)
    ext_train, ext_val = stratified_split(extra_labels, fraction, extra_rng, n_classes)

    def assemble(official_idx: np.ndarray, extra_idx: np.ndarray) -> dict[str, np.ndarray]:
        X = np.concatenate([train_images[official_idx], extra_images[extra_idx]])
        y = np.concatenate([train_labels[official_idx], extra_labels[extra_idx]])
        order = shuffle_rng.permutation(len(y))
        return {
            "X": np.ascontiguousarray(X[order].reshape(len(y), N_PIXELS), dtype=np.uint8),
            "y": np.ascontiguousarray(y[order], dtype=np.uint8),
        }

    arrays = {
        "train": assemble(off_train, ext_train),
        "val": assemble(off_val, ext_val),
        "test": {
            "X": np.ascontiguousarray(
                official["test_images"].reshape(-1, N_PIXELS), dtype=np.uint8
            ),
            "y": np.ascontiguousarray(official["test_labels"], dtype=np.uint8),
        },
    }
    extra_counts = {
        "train": np.bincount(extra_labels[ext_train], minlength=n_classes),
        "val": np.bincount(extra_labels[ext_val], minlength=n_classes),
    }
    return SplitResult(arrays, extra_counts, fraction)


def build_manifest(
    result: SplitResult,
    class_names: Sequence[str],
    val_size: int,
    seed: int,
    inputs: Mapping[str, Mapping[str, str]],
    extra_hash: str,
) -> dict:
    """What went into the split and what came out, for humans and for later checks.

    `inputs` maps a config file key to {"name": ..., "md5": ...}. No paths are recorded, so
    the manifest is the same wherever the pipeline runs.
    """
    per_class = {
        split: {name: int(n) for name, n in zip(class_names, result.counts(split), strict=True)}
        for split in SPLITS
    }
    return {
        "val_size": val_size,
        "seed": seed,
        "val_fraction": str(result.val_fraction),
        "class_names": list(class_names),
        "totals": {split: int(len(result.arrays[split]["y"])) for split in SPLITS},
        "counts": per_class,
        "extra": {
            "content_hash": extra_hash,
            "total": int(sum(result.extra_counts[s].sum() for s in ("train", "val"))),
            "per_class": {
                name: {s: int(result.extra_counts[s][i]) for s in ("train", "val")}
                for i, name in enumerate(class_names)
            },
        },
        "inputs": {key: dict(spec) for key, spec in inputs.items()},
    }


def write_split(split_dir: str | Path, result: SplitResult, manifest: Mapping) -> list[Path]:
    """Write `<split>.npz` (arrays X and y) and the manifest, each atomically, manifest last."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in SPLITS:
        path = split_dir / f"{split}.npz"
        write_npz(path, result.arrays[split])
        written.append(path)
    path = split_dir / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    written.append(path)
    return written


def split_table(result: SplitResult, class_names: Sequence[str]) -> str:
    """A plain-text table of images per class and split; "(k extra)": k of them are extras."""
    width = max(len(name) for name in [*class_names, "total"])
    counts = {split: result.counts(split, len(class_names)) for split in SPLITS}

    def cell(split: str, i: int | None) -> str:
        n = counts[split].sum() if i is None else counts[split][i]
        extra = result.extra_counts.get(split)
        if extra is not None and extra.sum():
            n_extra = extra.sum() if i is None else extra[i]
            return f"{n} ({n_extra} extra)" if n_extra else str(n)
        return str(n)

    rows = [["class", *SPLITS]]
    rows += [[name, *(cell(s, i) for s in SPLITS)] for i, name in enumerate(class_names)]
    rows.append(["total", *(cell(s, None) for s in SPLITS)])
    widths = [width] + [max(len(r[j]) for r in rows) for j in range(1, 4)]
    return "\n".join(
        "  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(
            zip(row, widths, strict=True)))
        for row in rows
    )


def load_split(split_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, 784) uint8, y (n,) uint8) of one split written by `write_split`."""
    path = Path(split_dir) / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the split stage first (`make data`)")
    with np.load(path) as arrays:
        return arrays["X"], arrays["y"]


def check_manifest(split_dir: str | Path, val_size: int, seed: int,
                   md5s: Mapping[str, str]) -> None:
    """Refuse a split made with other parameters than the ones about to be recorded with it."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the split stage first (`make data`)")
    manifest = json.loads(path.read_text())
    made = {"val_size": manifest.get("val_size"), "seed": manifest.get("seed"),
            **{key: entry.get("md5") for key, entry in manifest.get("inputs", {}).items()}}
    wanted = {"val_size": val_size, "seed": seed, **md5s}
    differing = [f"{key}: split has {made.get(key)!r}, configuration says {value!r}"
                 for key, value in wanted.items() if made.get(key) != value]
    if differing:
        raise DatasetError(
            f"{path} was made with other data parameters ({'; '.join(differing)}); "
            "rerun the split stage (`dvc repro split`, or `dvc exp run -S data....`)")
