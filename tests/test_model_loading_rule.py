"""Models are loaded in one module: only pipeline/support/model_loader.py calls a model loader.

skops' `load`, `loads` and `get_untrusted_types`, and MLflow's `Model.load`,
`download_artifacts` and flavor `load_model` are where a model could be rebuilt without the
trusted-types and MLmodel checks. The package's sources are parsed, not imported, so a lazy
import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.synthetic import REPO_ROOT

PACKAGE = REPO_ROOT / "pipeline"
THE_LOADER = PACKAGE / "support" / "model_loader.py"
ANYWHERE = {"get_untrusted_types", "download_artifacts"}  # no other library has these names


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of names and attributes, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    if isinstance(node, ast.Call):  # import_skops().load(...)
        inner = _dotted(node.func)
        return ".".join([f"{inner}()", *reversed(parts)]) if inner else None
    return None


def model_loading_calls(path: Path) -> list[str]:
    """`line: call` for each call of a model loader in `path`."""
    tree = ast.parse(path.read_text())
    skops, mlflow_model, mlflow_loaders = {"skops.io", "import_skops()"}, set(), set()
    for node in ast.walk(tree):  # the local names of skops.io, MLflow's Model and its loaders
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("skops") and alias.asname:
                    skops.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                local = alias.asname or alias.name
                if node.module == "skops" and alias.name == "io":
                    skops.add(local)
                elif node.module.startswith("skops.io") and alias.name in ("load", "loads"):
                    skops.add(f"<{local}>")
                elif node.module.startswith("mlflow") and alias.name == "Model":
                    mlflow_model.add(local)
                elif node.module.startswith("mlflow") and alias.name == "load_model":
                    mlflow_loaders.add(local)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and _dotted(
                node.value.func) in {"import_skops", "model_files.import_skops"}:
            skops.update(t.id for t in node.targets if isinstance(t, ast.Name))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func) or ""
        receiver, _, attribute = name.rpartition(".")
        if (attribute in ANYWHERE
                or attribute in ("load", "loads") and (receiver in skops
                                                      or receiver.endswith("import_skops()"))
                or f"<{name}>" in skops
                or attribute == "load" and (receiver in mlflow_model
                                            or receiver.endswith("models.Model"))
                or name in mlflow_loaders
                or attribute == "load_model" and receiver.startswith("mlflow")):
            found.append(f"{node.lineno}: {name}")
    return found


def test_only_the_model_loader_loads_models() -> None:
    offenders = {str(path.relative_to(REPO_ROOT)): calls
                 for path in sorted(PACKAGE.rglob("*.py")) if path != THE_LOADER
                 if (calls := model_loading_calls(path))}
    assert offenders == {}, ("load models through pipeline.support.model_loader, not here: "
                             f"{offenders}")


def test_the_model_loader_is_where_they_are() -> None:
    calls = {call.split(": ", 1)[1] for call in model_loading_calls(THE_LOADER)}
    assert {"skops_io.get_untrusted_types", "skops_io.load", "skops_io.loads", "Model.load",
            "mlflow.artifacts.download_artifacts"} <= calls


def test_the_check_sees_every_form_of_call(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import skops.io as sio\nfrom skops import io as sk\nfrom skops.io import loads\n"
        "from mlflow.models import Model as M\nfrom mlflow.sklearn import load_model\n"
        "import mlflow.pyfunc\nfrom pipeline.support.model_files import import_skops\n"
        "def f(client, data):\n"
        "    sio.load('m.skops'); sk.get_untrusted_types(file='m.skops'); loads(data)\n"
        "    M.load('runs:/r/model'); load_model('models:/m/1')\n"
        "    mlflow.pyfunc.load_model('models:/m/1'); client.download_artifacts('r', 'p')\n"
        "    import_skops().loads(data); s = import_skops(); s.load('m.skops')\n"
        "    import json, pickle; json.loads('{}'); yaml_load = 1\n")
    calls = {call.split(": ", 1)[1] for call in model_loading_calls(module)}
    assert calls == {"sio.load", "sk.get_untrusted_types", "loads", "M.load", "load_model",
                     "mlflow.pyfunc.load_model", "client.download_artifacts",
                     "import_skops().loads", "s.load"}
