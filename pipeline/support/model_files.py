"""The model file format (skops), writing side: what a model file may contain, and its bytes.

A model is only ever rebuilt by skops with TRUSTED_TYPES (see `model_loader`, the one module
that loads models). Here: the list of those types, `save` with reproducible bytes, skops's own
table of safe types kept once per environment, and the requirements logged with a model.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path
from typing import Any

# Types skops must be allowed to rebuild beyond its own safe list: our classes only.
TRUSTED_TYPES = [
    "pipeline.core.estimator.SoftmaxRegression",
    "pipeline.core.preprocessing.PixelFeatures",
]


# skops's table of the types it trusts by default (a copy is kept, see import_skops).
_TRUSTED_TYPES_MODULE = "skops.io._trusted_types"
_TABLE_PACKAGES = ("skops", "scikit-learn", "numpy", "scipy")


def _trusted_types_cache() -> tuple[Path, str]:
    from importlib.metadata import version

    key = " ".join([sys.version.split()[0], *(f"{p}=={version(p)}" for p in _TABLE_PACKAGES)])
    return Path(sys.prefix) / "skops-trusted-types.json", key


def import_skops() -> types.ModuleType:
    """`skops.io`, without rebuilding its table of default-trusted types in every process.

    Importing skops.io builds that table by importing every scikit-learn estimator and scanning
    numpy and scipy: about a second, in each stage and each `predict`. The table only changes
    with the installed packages, so the first import in an environment keeps skops's own table
    next to the interpreter (in `sys.prefix`, as trusted as the packages themselves), keyed by
    the Python and package versions, and later imports hand it to skops. It grants nothing that
    skops would not: a table of another version, or none, means the normal import.
    """
    if "skops.io" in sys.modules:
        return sys.modules["skops.io"]
    from pipeline.core.files import atomic_write_text

    path, key = _trusted_types_cache()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if cached.get("key") == key and isinstance(cached.get("names"), dict):
        table = types.ModuleType(_TRUSTED_TYPES_MODULE)
        vars(table).update(cached["names"])
        sys.modules[_TRUSTED_TYPES_MODULE] = table
        try:
            import skops.io
            return skops.io
        except ImportError:  # skops wants a name the copy lacks: forget it, import normally
            for name in [name for name in sys.modules if name.startswith("skops.io")]:
                del sys.modules[name]
    import skops.io

    names = {name: value for name, value in vars(sys.modules[_TRUSTED_TYPES_MODULE]).items()
             if name.isupper() and isinstance(value, list)
             and all(isinstance(item, str) for item in value)}
    with contextlib.suppress(OSError):  # read-only: every process scans, as without a copy
        atomic_write_text(path, json.dumps({"key": key, "names": names}, indent=1) + "\n")
    return skops.io


def save(estimator, path: str | Path) -> None:
    """Write atomically with skops: loading it later runs no arbitrary code.

    The archive is made reproducible first (`reproducible_skops`): the same model gives the same
    bytes, so DVC caches it once and `dvc.lock` shows whether a retrain reproduced it.
    """
    from pipeline.core.files import atomic_write_bytes

    atomic_write_bytes(path, reproducible_skops(import_skops().dumps(estimator)))


def reproducible_skops(archive: bytes) -> bytes:
    """The same skops archive with nothing that depends on the process or the clock.

    skops names each object by its memory address (`__id__`, and the `<id>.npy` file of each
    array) and stamps every zip entry with the current time. Here the ids become 1, 2, ... in the
    order they first appear in `schema.json` (the same object keeps one number, so shared
    references still load as one object), files are renamed to match, entries are sorted and
    stored uncompressed with a fixed date and mode. `skops.io.load` reads it as before.
    """
    import io
    import zipfile

    from pipeline.core.files import fixed_zip_info

    with zipfile.ZipFile(io.BytesIO(archive)) as source:
        schema = json.loads(source.read("schema.json"))
        ids: dict[int, int] = {}
        files: dict[str, str] = {}

        def renumber(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "__id__" and isinstance(value, int):
                        node[key] = ids.setdefault(value, len(ids) + 1)
                    elif key == "file" and isinstance(value, str):
                        suffix = Path(value).suffix
                        node[key] = files.setdefault(value, f"{len(files) + 1}{suffix}")
                    else:
                        renumber(value)
            elif isinstance(node, list):
                for value in node:
                    renumber(value)

        renumber(schema)
        entries = {new: source.read(old) for old, new in files.items()}
    entries["schema.json"] = json.dumps(schema, indent=2).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as target:
        for name in sorted(entries):
            target.writestr(fixed_zip_info(name), entries[name])
    return buffer.getvalue()


def pip_requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference starts a subprocess and costs seconds per model."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}"
            for package in ("mlflow", "scikit-learn", "skops", "numpy", "threadpoolctl")]
