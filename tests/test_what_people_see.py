"""What a newcomer sees (issue 19): the output of `make train`, `make plots`, `make exps`,
`make samples` and the baseline's training, captured from the real commands in a repository copy.

The tests share one trained copy and run in any order: each only adds to it (plots folders, an
experiment, a baseline run under its own parameter file), never changes what another one reads.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.repo_copy import MAKE, Repo, make_repo
from tests.synthetic import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Repo, str]]:
    """The copy after `make train`, and everything `make train` printed."""
    base = tmp_path_factory.mktemp("seen")
    repo = make_repo(base / "repo", base / "mirror")
    result = repo.run(*MAKE, "train")
    yield repo, result.stdout + result.stderr


def test_make_train_does_not_warn_about_the_empty_extra_folder(
        trained: tuple[Repo, str]) -> None:
    repo, output = trained
    assert "is empty" not in output, output
    assert (repo.root / "data" / "extra" / "README.md").is_file()
    # The note is not data: DVC's record of the folder is still that of an empty one.
    tracked = yaml.safe_load((repo.root / "data.dvc").read_text())["outs"][0]
    assert tracked["nfiles"] == 0 if "nfiles" in tracked else tracked["size"] == 0
    assert "up to date" in repo.dvc("status", "data.dvc").stdout.lower()
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())
    extra = next(dep for dep in lock["stages"]["split"]["deps"] if dep["path"] == "data/extra")
    assert extra["md5"] == tracked["md5"]


class _Scripts(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.sources += [value or "" for name, value in attrs if name == "src"]


def _script_sources(page: Path) -> list[str]:
    parser = _Scripts()
    parser.feed(page.read_text())
    return parser.sources


def _specs(page: Path) -> dict[str, dict]:
    """Title -> Vega-Lite spec of every plot on a page DVC wrote."""
    specs = [json.loads(text) for text in
             re.findall(r"var spec = (\{.*?\});\n", page.read_text(), re.S)]
    return {spec["title"]["text"] if isinstance(spec.get("title"), dict) else spec.get("title"):
            spec for spec in specs}


@pytest.mark.skipif(subprocess.run(["which", "npm"], capture_output=True).returncode != 0,
                    reason="npm is needed to fetch Vega for offline plots")
def test_plots_render_offline_and_diff_writes_its_own_folder(trained: tuple[Repo, str]) -> None:
    repo, _ = trained
    shown = repo.run(*MAKE, "plots")
    page = repo.root / "dvc_plots" / "show" / "index.html"
    assert "plots: open dvc_plots/show/index.html" in shown.stdout
    sources = _script_sources(page)
    assert sources == ["vega.min.js", "vega-lite.min.js", "vega-embed.min.js"]
    for source in sources:  # beside the page, so the folder opens anywhere, offline
        assert (page.parent / source).stat().st_size > 10_000
    assert not re.search(r"<script[^>]+src=[\"']?https?://", page.read_text())
    assert "cdn.jsdelivr" not in page.read_text()
    before = page.read_bytes()

    diffed = repo.run(*MAKE, "plots-diff")
    diff_page = repo.root / "dvc_plots" / "diff" / "index.html"
    assert "plots: open dvc_plots/diff/index.html" in diffed.stdout
    assert _script_sources(diff_page) == sources
    assert page.read_bytes() == before


def test_plots_without_npm_say_so_in_one_line_and_still_write_the_page(
        trained: tuple[Repo, str], tmp_path: Path) -> None:
    repo, _ = trained
    shutil.rmtree(repo.root / ".tools" / "vega", ignore_errors=True)
    bare = tmp_path / "bin"  # a PATH with git and the venv's tools, without npm
    bare.mkdir()
    (bare / "git").symlink_to(shutil.which("git"))
    env = {**repo.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{bare}"}
    result = subprocess.run([sys.executable, "-m", "pipeline.commands.plots", "show"],
                            cwd=repo.root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "plots: npm not found, so the page loads Vega from a CDN and is blank offline; install "
        "Node.js (npm) and run `make plots` again to render offline"]
    assert (repo.root / "dvc_plots" / "show" / "index.html").is_file()


def test_dvc_confusion_matrix_has_predicted_on_x_actual_on_y_in_label_order(
        trained: tuple[Repo, str]) -> None:
    repo, _ = trained
    out = repo.root / "confusion-check"
    repo.dvc("plots", "show", "-o", str(out))  # DVC's own page: the specs, whatever the scripts
    spec = _specs(out / "index.html")["Confusion matrix (test)"]
    encoding = spec["spec"]["encoding"]
    assert (encoding["x"]["field"], encoding["y"]["field"]) == ("predicted", "actual")
    assert encoding["x"]["sort"] == {"field": "x_order", "op": "min"}
    assert encoding["y"]["sort"] == {"field": "y_order", "op": "min"}
    orders = {step["as"]: step["calculate"] for step in spec["spec"]["transform"]
              if "calculate" in step}
    assert orders["x_order"] == "datum['predicted_label']"
    assert orders["y_order"] == "datum['actual_label']"
    # The sort keys are the labels of data.class_names, so the axes read as in the PNG.
    names = repo.params()["data"]["class_names"]
    rows = spec["data"]["values"]
    assert rows and all(names[int(row["actual_label"])] == row["actual"]
                        and names[int(row["predicted_label"])] == row["predicted"]
                        for row in rows)
    normalized = _specs(out / "index.html")["Confusion matrix (test, share of each actual class)"]
    share = next(step for step in normalized["spec"]["transform"] if "joinaggregate" in step)
    assert share["groupby"] == ["actual"]  # shares of each actual class: rows sum to 1


def test_make_exps_fits_120_columns_and_names_the_mlflow_run(trained: tuple[Repo, str]) -> None:
    repo, _ = trained
    repo.dvc("exp", "run", "-S", "model.epochs=3", "-n", "three-epochs")
    result = repo.run(*MAKE, "exps")
    lines = result.stdout.splitlines()
    assert all(len(line) <= 120 for line in lines), "\n".join(lines)
    assert lines[0].split() == ["Experiment", "Created", "Model", "val", "test", "secs",
                                "MLflow", "run"]
    experiment = next(line for line in lines if line.strip().startswith("three-epochs"))
    run_id = repo.json("models/run.json")["run_id"]  # dvc exp run leaves its run there
    assert experiment.split()[-1] == run_id
    assert float(experiment.split()[-2]) >= 0  # train seconds, from the run
    assert " ep3 " in experiment  # the run name: what differs (lr0.005 ep3 bs480 adam)
    scores = repo.json("metrics/evaluate.json")
    assert f"{scores['val']['accuracy']:.4f}" in experiment
    workspace = next(line for line in lines if line.startswith("workspace"))
    assert workspace.split()[-1] == run_id


def test_make_samples_writes_pngs_that_predict_reads(trained: tuple[Repo, str]) -> None:
    repo, _ = trained
    result = repo.run(*MAKE, "samples")
    names = repo.params()["data"]["class_names"]
    written = sorted(path.name for path in (repo.root / "samples").glob("*.png"))
    assert len(written) == len(names) and "shirt.png" in written and "ankle_boot.png" in written
    assert "samples: 10 test images in samples/" in result.stdout
    predicted = repo.run(sys.executable, "-m", "pipeline.predict", "samples/shirt.png",
                         "samples/sneaker.png")
    assert "samples/shirt.png" in predicted.stdout and "samples/sneaker.png" in predicted.stdout
    assert not subprocess.run(["git", "status", "--porcelain", "samples"], cwd=repo.root,
                              capture_output=True, text=True).stdout  # ignored, not committed


def test_the_baseline_reports_lbfgs_iterations_and_one_line_for_no_convergence(
        trained: tuple[Repo, str]) -> None:
    repo, _ = trained
    params = repo.params()
    params["model"] = {**yaml.safe_load((repo.root / "conf" / "model" /
                                         "sklearn_logreg.yaml").read_text()), "max_iter": 3}
    (repo.root / "baseline.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = repo.run(sys.executable, "-m", "pipeline.stages.train", "--params", "baseline.yaml")
    output = result.stdout + result.stderr
    assert "3/3" in result.stderr and "iteration/s" in result.stderr, result.stderr
    assert "epoch" not in output, output
    assert "(3 iterations)" in result.stdout
    assert "ConvergenceWarning" not in output and "site-packages" not in output
    warning = [line for line in result.stderr.splitlines() if "failed to converge" in line]
    assert warning == ["train: warning: lbfgs failed to converge after 3 iteration(s) "
                       "(status=1); the model is saved as it is; raise model.max_iter (or "
                       "model.tol) for a converged fit"]


def test_make_echoes_tune_and_serve_as_one_line_each() -> None:
    result = subprocess.run([*MAKE, "-n", "tune", "serve", "TRIALS=3", "STUDY=my study"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.rstrip().endswith("\\")], result.stdout
    assert any(line.endswith('-m pipeline.tune --trials 3 --workers 2 --study "my study"')
               for line in lines), result.stdout
    assert any(line.endswith("-m pipeline.commands.serve --port 5001") for line in lines)
