"""Stage `split`: raw archives + extra images -> data/split/{train,val,test}.npz + manifest.json.

Usage: python -m pipeline.stages.split [--params params.yaml]

The raw archives must carry the MD5s in `data.files` (the `download` stage guarantees it), so a
split always says exactly which data it was made from. See `pipeline.core.split` for the rules.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.files import md5sum
from pipeline.core.idx import IdxFormatError
from pipeline.core.labelled_images import ExtraDataError, check_extra_pixels, load_extra
from pipeline.core.split import (
    DatasetError,
    build_manifest,
    load_official,
    make_split,
    split_table,
    write_split,
)
from pipeline.support import config, errors


class StageError(PipelineError):
    """An expected failure, reported as one message without a traceback."""


def _check_raw(data: config.DataConfig) -> dict[str, Path]:
    paths = {}
    for key, spec in data.files.items():
        path = Path(data.raw_dir) / spec.name
        if not path.is_file():
            raise StageError(f"{path}: not found; run `python -m pipeline.stages.download` first")
        actual = md5sum(path)
        if actual != spec.md5:
            raise StageError(
                f"{path}: MD5 is {actual}, expected {spec.md5} (data.files.{key}.md5); "
                "run `python -m pipeline.stages.download` to fetch it again"
            )
        paths[key] = path
    return paths


def run(data: config.DataConfig) -> str:
    """Make and write the split; return the summary to print."""
    paths = _check_raw(data)
    official = load_official(paths)
    extra = load_extra(data.extra_dir, data.class_names)
    check_extra_pixels(extra, data.extra_dir, official["test_images"],
                       data.files["test_images"].name, data.class_names)
    result = make_split(official, data.val_size, data.seed, extra.images, extra.labels,
                        n_classes=len(data.class_names))
    inputs = {key: {"name": spec.name, "md5": spec.md5} for key, spec in data.files.items()}
    manifest = build_manifest(result, data.class_names, data.val_size, data.seed, inputs,
                              extra.content_hash)
    written = write_split(data.split_dir, result, manifest)
    note = f"{len(extra)} extra images from {data.extra_dir}" if len(extra) else (
        f"no extra images in {data.extra_dir}"
    )
    return (
        f"{split_table(result, data.class_names)}\n"
        f"val_size={data.val_size}, seed={data.seed}, {note}\n"
        f"wrote {', '.join(str(p) for p in written)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.split",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=config.PARAMS_FILE, help="composed parameter file")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
        print(run(cfg.data))
    except (config.ConfigError, StageError, IdxFormatError, ExtraDataError, DatasetError,
            OSError) as exc:  # OSError: a folder that cannot be made, a full disk
        errors.show_traceback(exc)
        print(f"split: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
