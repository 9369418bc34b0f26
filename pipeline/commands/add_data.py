"""Add newly labelled images to `data.extra_dir` and record them in data.dvc.

Usage: python -m pipeline.add_data DIR [--params params.yaml]

DIR has the layout of the extra folder (`DIR/<class>/*.png`, see
`pipeline.core.labelled_images`). The whole of DIR is checked first and every problem is reported
at once; if there is any, nothing is added. Each image then goes to
`<extra_dir>/<canonical class folder>/` (`3/` and `Dress/` both go to `dress/`), so the folder
names in the repository stay uniform:
- an image whose pixels are already in the extra folder under the same class is skipped and
  reported, so running the command twice adds nothing;
- the same pixels with another label there (or in DIR) are a conflict, reported as a problem;
- an image whose pixels equal an official test image (data/raw's t10k archive) is refused: the
  champion is chosen on that test set, so training on it would inflate its score. Pixels are
  compared, not files, so a re-encoded copy is caught too;
- a name already taken by another image gets a free name (`shoe.png` -> `shoe-1.png`).
All or nothing: the images are staged in a hidden folder on the same file system, then each is
linked to its final name, which never replaces an existing file; if one fails, those placed
are removed again. Then `dvc commit -f data.dvc` records the new content of the extra folder
(and saves it in the DVC cache), and the git and DVC commands that share it are printed.

Exit codes: 0 images added or all already there; 1 invalid input or a failure. When the DVC step
fails, the images stay in place and the message gives the command to finish by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.files import (
    MAX_IMAGE_FILE_BYTES,
    FileRefusedError,
    read_bounded,
)
from pipeline.core.idx import IdxFormatError, read_idx
from pipeline.core.labelled_images import (
    ExtraProblem,
    class_folder_name,
    class_index,
    decode_png,
    index_pixels,
    load_extra,
    official_test_images_among,
    pixel_key,
    validate_extra,
)
from pipeline.support import config, errors
from pipeline.support.workspace import (
    EXTRA_DVC_FILE,
    CommandError,
    child_env,
    dvc_remotes,
    find_repo_root,
    venv_tool,
)


class AddDataError(PipelineError):
    """Nothing (more) can be done; the message says why and what to do."""


@dataclass(frozen=True)
class Copy:
    source: Path
    label: int
    destination: Path  # the name planned; the final one may differ if it got taken meanwhile
    data: bytes = field(repr=False)


@dataclass
class Plan:
    copies: list[Copy] = field(default_factory=list)
    skipped: list[tuple[Path, Path]] = field(default_factory=list)  # (source, already there)


def _existing_images(extra_dir: Path, class_names: Sequence[str]) -> dict[bytes, tuple[int, Path]]:
    """pixel_key -> (label, path) of the PNGs already in the extra folder (an unreadable one is
    left to the split stage, which reports it)."""
    if not extra_dir.is_dir():
        return {}
    known: dict[bytes, tuple[int, Path]] = {}
    for folder in sorted(extra_dir.iterdir()):
        label = class_index(folder.name, class_names) if folder.is_dir() else None
        if label is None or folder.name.startswith("."):
            continue
        for file in sorted(folder.iterdir()):
            if file.is_file() and not file.name.startswith(".") and file.suffix.lower() == ".png":
                try:
                    pixels = decode_png(read_bounded(file, MAX_IMAGE_FILE_BYTES))
                except ValueError:
                    continue
                known.setdefault(pixel_key(pixels), (label, file))
    return known


@dataclass(frozen=True)
class OfficialTestSet:
    """The official test images, so that none of them is added as training data."""

    index: dict[bytes, int]  # pixel_key -> image number
    file: str


def official_test_set(root: Path, data: config.DataConfig) -> OfficialTestSet | None:
    """The test archive's images, indexed by pixels; None (with a note) if not downloaded yet:
    the split stage then refuses such images when it reads the extra folder."""
    path = root / data.raw_dir / data.files["test_images"].name
    if not path.is_file():
        print(f"add_data: note: {path} is not downloaded yet, so the images are not compared "
              "with the test set now; the split stage will compare them")
        return None
    try:
        images = read_idx(path, kind="images")
    except IdxFormatError as exc:
        raise AddDataError(f"{exc}; fetch it again with `python -m pipeline.stages.download`"
                           ) from None
    return OfficialTestSet(index_pixels(images), path.name)


def _free_name(folder: Path, name: str, taken: set[Path]) -> Path:
    """`name` in `folder`, else `stem-1.png`, `stem-2.png`...: the first not on disk nor planned."""
    candidate = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    number = 0
    while candidate.exists() or candidate in taken:
        number += 1
        candidate = folder / f"{stem}-{number}{suffix}"
    return candidate


def make_plan(source_dir: Path, extra_dir: Path, class_names: Sequence[str],
              test_set: OfficialTestSet | None = None) -> Plan:
    """Where each image of `source_dir` goes; AddDataError listing every problem if any.

    Images are compared by their pixels, not their files: an official test image (`test_set`)
    and the same pixels under two labels (in the extra folder or in `source_dir`) are refused.
    """
    if not source_dir.exists():
        raise AddDataError(f"{source_dir}: no such folder")
    if not source_dir.is_dir():
        raise AddDataError(f"{source_dir}: not a folder")
    problems = validate_extra(source_dir, class_names)
    if problems:
        raise AddDataError(_problem_report(problems, source_dir))
    incoming = load_extra(source_dir, class_names)
    if len(incoming) == 0:
        raise AddDataError(
            f"{source_dir}: no PNG images found; expected {source_dir}/<class>/*.png"
        )
    known = _existing_images(extra_dir, class_names)
    sources = [source_dir / relative for relative in incoming.paths]
    conflicts = [] if test_set is None else official_test_images_among(
        sources, incoming.images, test_set.index, test_set.file)
    plan, taken = Plan(), set()
    for source, image, label in zip(sources, incoming.images, incoming.labels, strict=True):
        key, label = pixel_key(image), int(label)
        if key in known:
            known_label, known_path = known[key]
            if known_label == label:
                plan.skipped.append((source, known_path))
            else:
                conflicts.append(ExtraProblem(
                    source, f"the same pixels are already labelled "
                    f"{class_names[known_label]!r} at {known_path}",
                ))
            continue
        folder = extra_dir / class_folder_name(label, class_names)
        destination = _free_name(folder, source.name, taken)
        taken.add(destination)
        plan.copies.append(Copy(source, label, destination,
                                read_bounded(source, MAX_IMAGE_FILE_BYTES)))
        known[key] = (label, source)
    if conflicts:
        raise AddDataError(_problem_report(conflicts, source_dir))
    return plan


def _problem_report(problems: Sequence[ExtraProblem], source_dir: Path) -> str:
    count = len(problems)
    lines = [f"{count} problem{'s' if count != 1 else ''} in {source_dir}; nothing was added:"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


def _link_without_clobbering(tmp: Path, destination: Path) -> Path:
    """Give `tmp` the first free name from `destination` on: a hard link never replaces a file."""
    while True:
        try:
            os.link(tmp, destination)
            return destination
        except FileExistsError:
            destination = _free_name(destination.parent, destination.name, set())
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            # A file system without hard links: a rename, checked just before.
            destination = _free_name(destination.parent, destination.name, set())
            os.rename(tmp, destination)
            return destination


def _write_staged(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def copy_all(copies: Sequence[Copy], extra_dir: Path) -> list[Path]:
    """Every image in place, or none: returns the final names, in the order of `copies`.

    The images are first written to a hidden folder next to `extra_dir` (the same file system,
    outside what data.dvc tracks), then linked into place one by one; if anything fails, the
    links and class folders made so far are removed again, so a failed call leaves nothing.
    """
    if not copies:
        return []
    extra_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{extra_dir.name}.adding-", dir=extra_dir.parent))
    placed: list[Path] = []
    made: list[Path] = []  # folders this call created, parents first
    try:
        staged = []
        for number, copy in enumerate(copies):
            staged.append(staging / f"{number}.png")
            try:
                _write_staged(staged[-1], copy.data)
            except OSError as exc:
                raise AddDataError(f"cannot stage {copy.source} in {staging}: "
                                   f"{exc.strerror or exc}") from None
        for copy, tmp in zip(copies, staged, strict=True):
            try:
                for folder in reversed([copy.destination.parent, *copy.destination.parent.parents]):
                    if not folder.exists():
                        folder.mkdir()
                        made.append(folder)
                placed.append(_link_without_clobbering(tmp, copy.destination))
            except OSError as exc:
                raise AddDataError(
                    f"copying {copy.source} to {copy.destination.parent} failed: "
                    f"{exc.strerror or exc}; nothing was added") from None
    except BaseException:
        for path in placed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return placed


def _tracked_path(dvc_file: Path) -> str:
    try:
        outs = yaml.safe_load(dvc_file.read_text()).get("outs") or []
        return str(outs[0]["path"])
    except (OSError, yaml.YAMLError, AttributeError, LookupError, TypeError) as exc:
        raise AddDataError(f"{dvc_file}: cannot read the tracked path: {exc!r}") from None


def check_dvc_file(root: Path, extra_dir: Path) -> Path:
    """data.dvc, after making sure that it tracks `extra_dir` (else the commit would miss it)."""
    dvc_file = root / EXTRA_DVC_FILE
    try:
        relative = extra_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise AddDataError(
            f"data.extra_dir {extra_dir} is outside the repository {root}, so "
            f"{EXTRA_DVC_FILE} cannot track it"
        ) from None
    if not dvc_file.is_file():
        raise AddDataError(f"{dvc_file} not found; create it once with `dvc add {relative}`")
    tracked = _tracked_path(dvc_file).rstrip("/")
    if Path(tracked) != Path(relative):
        raise AddDataError(
            f"{dvc_file} tracks {tracked!r}, but data.extra_dir is {relative!r}"
        )
    return dvc_file


def _summary(labels: Sequence[int], class_names: Sequence[str]) -> str:
    counts = Counter(labels)
    return ", ".join(f"{class_folder_name(label, class_names)}: {counts[label]}"
                     for label in sorted(counts))


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def add(source_dir: Path, params: Path) -> int:
    """The whole command; returns the exit code."""
    root = find_repo_root(params.absolute().parent)
    try:
        data = config.load(params).data
    except config.ConfigError as exc:
        raise AddDataError(str(exc)) from None
    extra_dir = root / data.extra_dir
    source_dir = source_dir.absolute()
    if source_dir.resolve() == extra_dir.resolve() or extra_dir.resolve() in (
        source_dir.resolve().parents
    ):
        raise AddDataError(f"{source_dir} is inside the extra folder {extra_dir} already")
    dvc_file = check_dvc_file(root, extra_dir)

    plan = make_plan(source_dir, extra_dir, data.class_names,
                     official_test_set(root, data))
    placed = copy_all(plan.copies, extra_dir)
    added = [copy.label for copy in plan.copies]
    # A few lines whatever the number of images: one example stands for each kind of event.
    if plan.skipped:
        source, existing = plan.skipped[0]
        print(f"add_data: skipped {_count(plan.skipped, 'image')} already present "
              f"(same content), e.g. {source}: same image as {existing}")
    renamed = [(copy, final) for copy, final in zip(plan.copies, placed, strict=True)
               if final.name != copy.source.name]
    if renamed:
        copy, final = renamed[0]
        print(f"add_data: renamed {_count(renamed, 'image')} whose name was taken, e.g. "
              f"{copy.source} -> {final.relative_to(root)}")
    summary = _summary(added, data.class_names)
    print(f"add_data: added {_count(added, 'image')}"
          + (f" ({summary})" if added else "")
          + f", skipped {len(plan.skipped)} already present")

    before = dvc_file.read_bytes() if dvc_file.is_file() else None
    dvc = venv_tool("dvc")
    command = [dvc, "commit", "-f", dvc_file.name]
    by_hand = f"cd {shlex.quote(str(root))} && dvc commit -f {dvc_file.name}"
    try:
        result = subprocess.run(command, cwd=root, env=child_env(), capture_output=True,
                                text=True)
    except OSError as exc:
        raise AddDataError(f"cannot run dvc: {exc}. The images are in place; finish with: "
                           f"{by_hand}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise AddDataError(
            f"`dvc commit -f {dvc_file.name}` failed (exit code {result.returncode}):\n{detail}\n"
            f"The images are in place in {extra_dir}; once the cause is fixed, finish with:\n"
            f"  {by_hand}"
        )
    if not added and dvc_file.is_file() and dvc_file.read_bytes() == before:
        print(f"add_data: nothing new; {dvc_file.name} unchanged")
        return 0
    try:
        remotes = dvc_remotes(root)
    except CommandError:
        remotes = []
    print(f"add_data: {dvc_file.name} updated (dvc commit -f {dvc_file.name}). To share:")
    message = f"Add {len(added)} labelled images ({summary})" if added else \
        "Update the extra labelled images"
    print(f"  git add {dvc_file.name} && git commit -m {shlex.quote(message)}")
    if remotes:
        print("  dvc push")
    else:
        print("  (no DVC remote configured: the images are only in this machine's DVC cache; "
              "add one with `dvc remote add -d <name> <url>`, then `dvc push`)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.add_data",
        description="Add a folder of labelled PNGs (DIR/<class>/*.png) to data.extra_dir "
                    "and record it in data.dvc.",
        epilog="Exit codes: 0 added (or all already present), 1 invalid input or failure.",
    )
    parser.add_argument("dir", type=Path, help="folder with one subfolder of PNGs per class")
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE),
                        help="composed parameter file; its directory (or a parent) holds dvc.yaml")
    args = parser.parse_args(argv)
    try:
        return add(args.dir, args.params)
    except (AddDataError, CommandError) as exc:
        errors.show_traceback(exc)
        print(f"add_data: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, FileRefusedError) as exc:
        errors.show_traceback(exc)
        print(f"add_data: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
