"""Small synthetic stand-ins for Fashion-MNIST, for tests of any stage.

`write_archives` writes the four gzipped IDX archives under their real names, with images that a
linear classifier separates easily (each class lights up its own block of the 28x28 grid, over
noise), and returns their names and MD5s; `data_params` and `write_params` turn those into a
`params.yaml` whose `data` section passes `pipeline.support.config.load`. `write_extra_folder`
makes a folder of extra labelled PNGs. Everything is deterministic given the seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from pipeline.core.files import md5sum
from pipeline.core.idx import write_idx
from pipeline.core.labelled_images import class_folder_name, class_index
from pipeline.support.config import FILE_KEYS, FileSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
DATA_CONF = CONF_DIR / "data" / "fashion_mnist.yaml"
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
N_CLASSES = len(CLASS_NAMES)


def make_images(labels: Sequence[int] | np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, 28, 28) uint8 images: class c is a bright 7x7 block at its own place, plus noise."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 4)  # a 3x4 grid of 7x7 blocks holds the 10 classes
        top, left = row * 9 + 1, col * 7
        brightness = rng.integers(150, 256)
        images[i, top:top + 7, left:left + 7] = brightness
    return images


def make_dataset(n_per_class: int, seed: int = 0,
                 n_classes: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """`n_per_class` images of every class, shuffled: (images (n, 28, 28), labels (n,)) uint8."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(n_classes, dtype=np.uint8), n_per_class))
    return make_images(labels, seed=seed + 1), labels


def write_archives(directory: str | Path, n_train_per_class: int = 50,
                   n_test_per_class: int = 10, seed: int = 0) -> dict[str, FileSpec]:
    """Write the four archives into `directory`; return {config key: FileSpec(name, md5)}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train = make_dataset(n_train_per_class, seed)
    test = make_dataset(n_test_per_class, seed + 1000)
    arrays = {
        "train_images": train[0], "train_labels": train[1],
        "test_images": test[0], "test_labels": test[1],
    }
    specs = {}
    for key in FILE_KEYS:
        path = directory / FILE_NAMES[key]
        write_idx(path, arrays[key])
        specs[key] = FileSpec(name=path.name, md5=md5sum(path))
    return specs


def data_params(files: Mapping[str, FileSpec], root: str | Path | None = None, *,
                mirrors: Sequence[str] = (), val_size: int = 100, seed: int = 42,
                retries: int = 1, backoff: float = 0.0, timeout: float = 5.0,
                **overrides: Any) -> dict[str, Any]:
    """A full `data` section: the project's own settings with these files and test-sized knobs.

    With `root`, raw_dir, extra_dir and split_dir are `root/data/{raw,extra,split}`; without,
    they keep their relative defaults (for a stage run with `root` as working directory).
    """
    base = yaml.safe_load(DATA_CONF.read_text())
    base.update(
        mirrors=list(mirrors),
        files={key: {"name": spec.name, "md5": spec.md5} for key, spec in files.items()},
        download={"retries": retries, "backoff": backoff, "timeout": timeout},
        val_size=val_size,
        seed=seed,
    )
    if root is not None:
        root = Path(root)
        base.update(raw_dir=str(root / "data" / "raw"), extra_dir=str(root / "data" / "extra"),
                    split_dir=str(root / "data" / "split"))
    base.update(overrides)
    return base


def default_section(group: str, option: str) -> dict[str, Any]:
    """One config group option as committed in conf/, e.g. ("model", "softmax")."""
    return yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text())


def write_params(path: str | Path, data: Mapping[str, Any], **sections: Any) -> Path:
    """Write a composed parameter file with this `data` section; other sections default to conf/."""
    path = Path(path)
    params = {
        "data": dict(data),
        "model": default_section("model", "softmax"),
        "mlflow": default_section("mlflow", "local"),
        **sections,
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_png(path: str | Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Save `array` as a PNG: mode "L" for a 2-D uint8 array, else converted to `mode`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array))
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    image.save(path, format="PNG")
    return path


def write_extra_folder(directory: str | Path, counts: Mapping[int | str, int], seed: int = 0,
                       class_names: Sequence[str] = CLASS_NAMES) -> dict[int, int]:
    """Write `counts[class]` PNGs per class into `directory/<folder>/`; return counts by index.

    A class given as an int gets the folder `class_folder_name` (e.g. `t-shirt_top`); a str is
    used as the folder name as it is (an index "3", or any accepted spelling of a name).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_index: dict[int, int] = {}
    for offset, (cls, n) in enumerate(counts.items()):
        if isinstance(cls, int):
            index, folder = cls, class_folder_name(cls, class_names)
        else:
            found = class_index(cls, class_names)
            if found is None:
                raise ValueError(f"{cls!r} is not a class folder name")
            index, folder = found, cls
        images = make_images([index] * n, seed=seed + 7919 * offset)
        for i, image in enumerate(images):
            write_png(directory / folder / f"img_{i:04d}.png", image)
        by_index[index] = by_index.get(index, 0) + n
    return by_index
