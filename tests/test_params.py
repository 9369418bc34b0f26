"""params.yaml is the composition of conf/, byte for byte, as `dvc exp run` would write it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.commands import params
from pipeline.support import composition, config, estimators
from tests.synthetic import REPO_ROOT


def test_committed_params_equal_the_composition_of_conf() -> None:
    composed = composition.compose(REPO_ROOT)
    assert (REPO_ROOT / "params.yaml").read_text() == composed, (
        "params.yaml is stale: run `make params` and commit it")


def test_group_override_swaps_the_model_section() -> None:
    composed = yaml.safe_load(
        composition.compose(REPO_ROOT, ["model=sklearn_logreg", "model.C=0.5"]))
    spec = estimators.check_params(config.validate(composed).model)
    assert spec.kind == "sklearn_logreg" and spec.params["C"] == 0.5


def copy_project(tmp_path: Path) -> Path:
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_check_flags_a_stale_file_and_make_params_fixes_it(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(copy_project(tmp_path))
    assert params.main(["--check"]) == 0
    conf = tmp_path / "conf" / "model" / "softmax.yaml"
    conf.write_text(conf.read_text().replace("epochs: 5", "epochs: 7"))
    assert params.main(["--check"]) == 1
    assert "make params" in capsys.readouterr().err
    assert params.main([]) == 0
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["model"]["epochs"] == 7
    assert params.main(["--check"]) == 0


def test_invalid_composition_is_refused_and_nothing_written(tmp_path, monkeypatch,
                                                            capsys) -> None:
    monkeypatch.chdir(copy_project(tmp_path))
    before = (tmp_path / "params.yaml").read_text()
    assert params.main(["model.learning_rate=-1"]) == 1
    assert "model.learning_rate=-1 is invalid" in capsys.readouterr().err
    assert params.main(["model.nonsense=1"]) == 1
    assert (tmp_path / "params.yaml").read_text() == before


@pytest.mark.parametrize("group", ["softmax", "sklearn_logreg"])
def test_a_run_logs_at_most_25_scalar_parameters(group: str) -> None:
    """What MLflow's compare page lists: the knobs, not class-name lists, mirrors or checksums."""
    from pipeline.support import tracking

    cfg = config.validate(yaml.safe_load(composition.compose(REPO_ROOT, [f"model={group}"])))
    spec = estimators.check_params(cfg.model)
    logged = tracking.run_params(cfg, spec.all_params, spec.target)
    assert len(logged) <= 25
    assert all(isinstance(value, (str, int, float, bool, type(None)))
               for value in logged.values()), logged
    assert {"data.val_size", "data.seed", "mlflow.promotion.metric"} <= set(logged)
    assert not [key for key in logged if key.startswith("data.") and key not in (
        "data.val_size", "data.seed")]


def test_dvc_experiment_tags_only_inside_dvc_exp_run() -> None:
    from pipeline.support import tracking

    assert tracking.dvc_experiment_tags({}) == {}
    assert tracking.dvc_experiment_tags(
        {"DVC_EXP_NAME": "fined-dogy", "DVC_EXP_BASELINE_REV": "64bba2f"}) == {
        "dvc_exp_name": "fined-dogy", "dvc_exp_baseline_rev": "64bba2f"}
