"""dvc.yaml stays in step with the code: every module a stage runs is a dependency, and the
paths the stages write are the outputs DVC records."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.support.estimators import KINDS
from pipeline.support.model_files import TRUSTED_TYPES
from pipeline.support.outputs import Outputs
from tests.synthetic import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


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
    if path.name == "estimators.py" and path.parent.name == "support":
        # The model factories are imported by name, from the `_target_` of the configuration.
        names.update(target.rpartition(".")[0] for target in KINDS)
    if path.name == "model_loader.py" and path.parent.name == "support":
        # skops imports the classes of a model file by name, as it rebuilds them.
        names.update(name.rpartition(".")[0] for name in TRUSTED_TYPES)
    return {name for name in names if name.startswith("pipeline")}


def import_closure(entry: Path) -> set[str]:
    """Every file of the package that `entry` imports, directly or not (lazy imports too)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, imported_modules(path)) if f is not None]
    return {str(p.relative_to(REPO_ROOT)) for p in seen if p.name != "__init__.py"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    command = STAGES[stage]["cmd"]
    module = command.split("-m ", 1)[1].split()[0]
    needed = import_closure(module_file(module))
    declared = {dep for dep in STAGES[stage]["deps"] if dep.startswith("pipeline/")}
    assert needed == declared, (f"add to the deps of {stage}: {sorted(needed - declared)}; "
                                f"remove: {sorted(declared - needed)}")


STAGE_MODULES = sorted((REPO_ROOT / "pipeline" / "stages").glob("[!_]*.py"))


@pytest.mark.parametrize("path", STAGE_MODULES, ids=lambda path: path.stem)
def test_a_stage_imports_no_other_stage(path: Path) -> None:
    others = import_closure(path) & {str(p.relative_to(REPO_ROOT)) for p in STAGE_MODULES}
    assert others == {str(path.relative_to(REPO_ROOT))}


def test_every_stage_module_is_a_dvc_stage() -> None:
    commands = {STAGES[stage]["cmd"].split("-m ", 1)[1].split()[0] for stage in STAGES}
    assert commands == {f"pipeline.stages.{path.stem}" for path in STAGE_MODULES}


def imports_in(source: str, package: str) -> set[str]:
    """Every module `source` (a module of `package`) imports, `from .x` and `from ..x`
    resolved; lazy imports inside functions too. Shared by the tests of the package's rules."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] \
                if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def absolute_imports(path: Path, package: str) -> set[str]:
    """Every module `path` imports, `from .x` and `from ..x` resolved from `package`."""
    return imports_in(path.read_text(), package)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "pipeline" / "core").glob("*.py")),
                         ids=lambda path: path.stem)
def test_the_core_imports_no_framework(path: Path) -> None:
    imported = absolute_imports(path, "pipeline.core")
    assert not {name.split(".")[0] for name in imported} & {
        "mlflow", "dvc", "hydra", "omegaconf", "matplotlib"}
    outside = {name for name in imported if name.split(".")[0] == "pipeline"
               and not name.startswith("pipeline.core")}
    assert not outside, f"the core imports {sorted(outside)}"


def test_the_core_check_sees_every_form_of_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import pipeline.support.store\nfrom ..support import store\n"
                      "from . import idx\nfrom pipeline.core.files import open_regular\n")
    assert absolute_imports(module, "pipeline.core") >= {
        "pipeline.support.store", "pipeline.support", "pipeline.core.idx",
        "pipeline.core.files"}


def outs(stage: str) -> set[str]:
    entries = STAGES[stage].get("outs", []) + STAGES[stage].get("metrics", [])
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_stage_outputs_are_where_the_code_writes() -> None:
    out = Outputs()
    written = {
        # models/run.json and models/registration.json name a run of one store: no outs
        "train": {out.model, out.train_metrics, out.history, out.learning_curves},
        "evaluate": {out.evaluate_metrics, out.evaluation, out.predictions("test"),
                     out.predictions("val")},
        "register": set(),
    }
    for stage, paths in written.items():
        assert {str(path) for path in paths} == outs(stage), stage
