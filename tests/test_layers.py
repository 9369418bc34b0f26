"""The package's floors: core < support < stages < the stage chain < commands, no climbing, and
no command leaning on another command (a shared piece belongs a floor lower)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import REPO_ROOT
from tests.test_dvc_yaml import imports_in

PACKAGE = REPO_ROOT / "pipeline"
FLOORS = ("core", "support", "team", "stages", "stage_chain", "commands")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every pipeline module `path` imports, relative imports resolved, lazy ones included."""
    if package is None:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = imports_in(path.read_text(), package)
    return {name for name in names if name.split(".")[0] == "pipeline"}


def floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else None


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_floor_above_its_own(path: Path) -> None:
    own = floor(module_name(path))
    if own is None:  # pipeline/__init__ and the `python -m pipeline.X` entry points
        return
    above = {name for name in imports(path)
             if floor(name) is not None and FLOORS.index(floor(name)) > FLOORS.index(own)}
    assert not above, f"{module_name(path)} ({own}) imports from a floor above: {sorted(above)}"


COMMANDS = sorted((PACKAGE / "commands").glob("[!_]*.py"))


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.stem)
def test_no_command_imports_another_command(path: Path) -> None:
    others = {name for name in imports(path) if name.startswith("pipeline.commands.")
              and name.split(".")[2] != path.stem}
    assert not others, f"{path.stem} imports {sorted(others)}: move what they share a floor down"


def test_the_check_sees_a_command_importing_a_command(tmp_path: Path) -> None:
    folder = tmp_path / "pipeline" / "commands"
    folder.mkdir(parents=True)
    (folder / "serve.py").write_text("from pipeline.commands import predict\n"
                                     "from . import params\n")
    found = {name for name in imports(folder / "serve.py", "pipeline.commands")
             if name.startswith("pipeline.commands.")}
    assert {"pipeline.commands.predict", "pipeline.commands.params"} <= found
