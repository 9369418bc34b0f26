"""`make samples`: a few official Fashion-MNIST test images as PNG files in samples/.

Usage: python -m pipeline.commands.samples [--out samples] [--params params.yaml]

The README's predict example needs an image file; these are the first test image of each class,
named after it (samples/shirt.png, samples/sneaker.png, ...). They come from the downloaded,
MD5-checked test archive (`make data`), so nothing binary is committed.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_write_bytes
from pipeline.core.idx import read_idx
from pipeline.core.labelled_images import class_folder_name
from pipeline.support import config, errors


class SamplesError(PipelineError):
    """The test archives are not there; the message says how to get them."""


def write_samples(raw_dir: Path, files: dict, class_names: Sequence[str], out: Path) -> list[Path]:
    """One PNG per class (its first test image); returns the files, in label order."""
    from PIL import Image

    images_path = raw_dir / files["test_images"].name
    labels_path = raw_dir / files["test_labels"].name
    missing = [str(p) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise SamplesError(f"{', '.join(missing)} not found: run `make data` first")
    images, labels = read_idx(images_path), read_idx(labels_path)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for label in range(len(class_names)):
        found = (labels == label).nonzero()[0]
        if not len(found):
            continue
        buffer = io.BytesIO()
        Image.fromarray(images[found[0]], mode="L").save(buffer, format="PNG")
        path = out / f"{class_folder_name(label, class_names)}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.samples",
                                     description="Write one test image per class to samples/.")
    parser.add_argument("--out", type=Path, default=Path("samples"))
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE))
    args = parser.parse_args(argv)
    try:
        data = config.load(args.params).data
        written = write_samples(Path(data.raw_dir), data.files, data.class_names, args.out)
    except (PipelineError, OSError) as exc:
        errors.show_traceback(exc)
        print(f"samples: error: {exc}", file=sys.stderr)
        return 1
    print(f"samples: {len(written)} test images in {args.out}/: "
          f"{', '.join(path.name for path in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
