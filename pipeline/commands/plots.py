"""`make plots` / `make plots-diff`: DVC's plots as a page that renders without the internet.

Usage: python -m pipeline.commands.plots show
       python -m pipeline.commands.plots diff [REV ...]

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline it is blank. Here the
three scripts (BSD-3-Clause) come once from the npm registry into .tools/vega/ (`npm pack`, no
node_modules), DVC fills our template (`--html-template`, which names them instead of the CDN),
and the scripts are copied beside the page: the folder opens anywhere, offline. `show` and `diff`
write to different folders, so a comparison does not overwrite the current plots.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_write_bytes, atomic_write_text
from pipeline.support import errors
from pipeline.support.workspace import CommandError, child_env, find_repo_root, venv_tool

# Pinned: the page is the same on every machine. Package -> the browser build it ships.
PACKAGES = {
    "vega@5.33.1": "vega.min.js",
    "vega-lite@5.23.0": "vega-lite.min.js",
    "vega-embed@6.29.0": "vega-embed.min.js",
}
TOOLS_DIR = Path(".tools") / "vega"
OUT_DIRS = {"show": Path("dvc_plots") / "show", "diff": Path("dvc_plots") / "diff"}

# DVC's own page (dvc_render.html.PAGE_HTML) without its {scripts}, which are the CDN's.
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC plots</title>
SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
""".replace("SCRIPTS", "\n".join(f'    <script src="{name}"></script>'
                                for name in PACKAGES.values()))


class PlotsError(PipelineError):
    """A step failed; the message says which and what to do."""


def install_vega(tools: Path) -> bool:
    """The three scripts in `tools`, fetched once with `npm pack`; False (and one line) if npm
    is missing, in which case the page falls back to DVC's CDN scripts."""
    if all((tools / name).is_file() for name in PACKAGES.values()):
        return True
    npm = shutil.which("npm")
    if npm is None:
        print("plots: npm not found, so the page loads Vega from a CDN and is blank offline; "
              "install Node.js (npm) and run `make plots` again to render offline",
              file=sys.stderr)
        return False
    tools.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tools) as folder:
        result = subprocess.run([npm, "pack", "--silent", "--pack-destination", folder,
                                 *PACKAGES], capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise PlotsError(f"`npm pack {' '.join(PACKAGES)}` failed (exit code "
                             f"{result.returncode}): {detail[-1] if detail else 'no output'}")
        for spec, name in PACKAGES.items():
            package, _, version = spec.rpartition("@")
            archive = Path(folder) / f"{package}-{version}.tgz"
            with tarfile.open(archive) as tar:
                member = tar.extractfile(f"package/build/{name}")
                if member is None:
                    raise PlotsError(f"{archive.name} has no package/build/{name}")
                atomic_write_bytes(tools / name, member.read())
    atomic_write_text(tools / "VERSIONS", "".join(
        f"{spec} BSD-3-Clause (npm pack; build/{name})\n" for spec, name in PACKAGES.items()))
    return True


def render(mode: str, revisions: Sequence[str], root: Path) -> Path:
    """Run `dvc plots show|diff` into its own folder; returns the page."""
    tools = root / TOOLS_DIR
    offline = install_vega(tools)
    out = root / OUT_DIRS[mode]
    command = [venv_tool("dvc"), "plots", mode, *revisions, "-o", str(out)]
    if offline:
        template = tools / "page.html"
        atomic_write_text(template, TEMPLATE)
        command += ["--html-template", str(template)]
    result = subprocess.run(command, cwd=root, env=child_env(), capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise PlotsError(f"`dvc plots {mode}` failed (exit code {result.returncode}):\n{detail}")
    if offline:
        for name in PACKAGES.values():
            shutil.copyfile(tools / name, out / name)
    return out / "index.html"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.commands.plots",
        description="Render DVC's plots to dvc_plots/show or dvc_plots/diff, offline.")
    parser.add_argument("mode", choices=sorted(OUT_DIRS),
                        help="show: the workspace; diff: compare with revisions")
    parser.add_argument("revisions", nargs="*",
                        help="diff only: commits, branches or experiment names (default HEAD)")
    args = parser.parse_args(argv)
    if args.mode == "show" and args.revisions:
        parser.error("`show` takes no revisions; use `diff REV ...`")
    try:
        page = render(args.mode, args.revisions, find_repo_root(Path.cwd()))
    except (PlotsError, CommandError, OSError) as exc:
        errors.show_traceback(exc)
        print(f"plots: error: {exc}", file=sys.stderr)
        return 1
    print(f"plots: open {page.relative_to(Path.cwd().absolute())}"
          if page.is_relative_to(Path.cwd().absolute()) else f"plots: open {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
