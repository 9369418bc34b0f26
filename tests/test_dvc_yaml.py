"""dvc.yaml stays in step with the code: every module a stage runs is a dependency, and the
paths the stages write are the outputs DVC records."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.outputs import Outputs
from tests.synthetic import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
# Modules imported only by a direct Hydra run (`python -m pipeline.train ...`), never by the
# DVC stage, which stops after training; evaluate and register are their own stages.
DIRECT_RUN_ONLY = {"train": {"pipeline/evaluate.py", "pipeline/register.py",
                             "pipeline/summary.py"}}


def module_file(name: str) -> Path | None:
    path = REPO_ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("pipeline")}


def import_closure(entry: Path, skip: set[str] = frozenset()) -> set[str]:
    """Every file of the package that `entry` imports, directly or not (lazy imports too)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen or str(path.relative_to(REPO_ROOT)) in skip:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, imported_modules(path)) if f is not None]
    return {str(p.relative_to(REPO_ROOT)) for p in seen if p.name != "__init__.py"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    command = STAGES[stage]["cmd"]
    module = command.split("-m ", 1)[1].split()[0]
    needed = import_closure(module_file(module), DIRECT_RUN_ONLY.get(stage, set()))
    declared = {dep for dep in STAGES[stage]["deps"] if isinstance(dep, str)}
    assert needed <= declared, f"add to the deps of {stage}: {sorted(needed - declared)}"


def outs(stage: str) -> set[str]:
    entries = STAGES[stage].get("outs", []) + STAGES[stage].get("metrics", [])
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_stage_outputs_are_where_the_code_writes() -> None:
    out = Outputs()
    written = {
        "train": {out.model, out.run, out.train_metrics, out.history, out.learning_curves},
        "evaluate": {out.evaluate_metrics, out.evaluation, out.predictions("test"),
                     out.predictions("val")},
        "register": {out.registration},
    }
    for stage, paths in written.items():
        assert {str(path) for path in paths} == outs(stage), stage
