"""The stages are chained by calls in one module, `pipeline.stage_chain`; `dvc repro` chains them
through files. Any other module of the package that needs the chain calls that module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import REPO_ROOT
from tests.test_dvc_yaml import imports_in

PACKAGE = REPO_ROOT / "pipeline"
CHAINED = {"pipeline.stages.train", "pipeline.stages.evaluate", "pipeline.stages.register"}
CHAIN_MODULE = PACKAGE / "stage_chain.py"


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).parent.parts)


def chained_stages_imported(source: str, package: str) -> set[str]:
    """Which of the train, evaluate and register stages `source` (a module of `package`)
    imports, in any form: `import`, `from ... import`, relative."""
    names = imports_in(source, package)
    return {stage for stage in CHAINED
            if any(name == stage or name.startswith(stage + ".") for name in names)}


OTHERS = sorted(path for path in PACKAGE.rglob("*.py")
                if path != CHAIN_MODULE and (PACKAGE / "stages") not in path.parents)


@pytest.mark.parametrize("path", OTHERS, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_other_module_chains_the_stages(path: Path) -> None:
    imported = chained_stages_imported(path.read_text(), package_of(path))
    assert len(imported) <= 1, (
        f"{path.relative_to(REPO_ROOT)} imports {sorted(imported)}: chain the stages through "
        "pipeline.stage_chain instead")


def test_the_chain_module_imports_the_three_stages_and_is_no_stage_or_command() -> None:
    assert chained_stages_imported(CHAIN_MODULE.read_text(), "pipeline") == CHAINED
    assert CHAIN_MODULE.parent == PACKAGE  # neither under pipeline/stages/ nor pipeline/commands/


@pytest.mark.parametrize("source", [
    "from pipeline.stages import train, evaluate, register\n",
    "import pipeline.stages.train\nimport pipeline.stages.evaluate\n"
    "from pipeline.stages.register import run\n",
    "from ..stages import train\nfrom ..stages.evaluate import run\nfrom .. import stages\n"
    "from ..stages import register as r\n",
    "def f():\n    from pipeline.stages import train, evaluate, register\n",  # a lazy import
])
def test_the_rule_sees_every_form_of_import(source: str) -> None:
    assert chained_stages_imported(source, "pipeline.commands") == CHAINED
