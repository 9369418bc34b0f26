"""The predict command: its inputs, outputs and errors, and agreement with the evaluate stage.

Fast tests call `main` in-process with a small SoftmaxRegression saved with skops. Slow ones run
the command in a repository copy after `dvc repro` (the champion of a real MLflow registry), and,
when the real archives are available, with a model trained on the real training set.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.commands import predict
from pipeline.core.estimator import SoftmaxRegression
from pipeline.core.idx import read_idx, write_idx
from pipeline.support import config, estimators, model_files, model_loader
from pipeline.support.workspace import mirror_directory
from tests.repo_copy import MODEL_NAME, Repo, make_repo
from tests.synthetic import (
    CLASS_NAMES,
    REPO_ROOT,
    data_params,
    make_dataset,
    make_images,
    write_params,
    write_png,
)

TEST_IMAGES = "t10k-images-idx3-ubyte.gz"

_shared: dict[str, Repo] = {}


def trained_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A repository copy after `dvc repro` on synthetic data, built once per session and only
    read afterwards, so tests/test_serve.py serves the same champion without a second repro."""
    if "repo" not in _shared:
        repo = make_repo(tmp_path_factory.mktemp("predict-repo"),
                         tmp_path_factory.mktemp("predict-mirror"))
        repo.dvc("repro")
        _shared["repo"] = repo
    return _shared["repo"]


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = predict.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- A small model saved with skops, and inputs in every format ------------------------------


@dataclass
class Setup:
    root: Path
    params: Path
    model_file: Path
    model: SoftmaxRegression
    images: np.ndarray  # (6, 28, 28) uint8: the first two are the PNGs, the rest the IDX file
    labels: np.ndarray

    def expected(self, images: np.ndarray) -> list[str]:
        return [CLASS_NAMES[label] for label in self.model.predict(images.reshape(-1, 784))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, archives) -> Setup:
    root = tmp_path_factory.mktemp("predict")
    params = write_params(root / "params.yaml", data_params(archives.specs))
    X, y = make_dataset(20, seed=5)
    model = SoftmaxRegression(epochs=5, random_state=0).fit(X.reshape(len(X), -1), y)
    model_files.save(model, root / "model.skops")
    labels = np.array([3, 8, 0, 1, 7, 9], dtype=np.uint8)
    images = make_images(labels, seed=11)
    write_png(root / "coat.png", images[0])
    write_png(root / "bag.png", images[1])
    write_idx(root / "images-idx3-ubyte.gz", images[2:])
    write_idx(root / "images-idx3-ubyte", images[2:])
    return Setup(root, params, root / "model.skops", model, images, labels)


def _cli(setup: Setup, capsys, *args: str) -> tuple[int, str, str]:
    return run_main(capsys, *args, "--model", setup.model_file, "--params", setup.params)


def test_png_and_idx_inputs_give_an_aligned_table(setup: Setup, capsys) -> None:
    root = setup.root
    code, out, err = _cli(setup, capsys, root / "coat.png", root / "bag.png",
                          root / "images-idx3-ubyte.gz")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["source", "class", "probability"]
    assert [row.split()[0] for row in rows] == [
        str(root / "coat.png"), str(root / "bag.png"),
        *(f"{root / 'images-idx3-ubyte.gz'}[{i}]" for i in range(4))]
    # Columns line up: every class name starts where the header's "class" does.
    start = header.index("class")
    assert [row[start:].rsplit(None, 1)[0].strip() for row in rows] == setup.expected(
        setup.images)
    assert len({len(row) for row in [header, *rows]}) == 1
    assert "6 images, model" in err and str(setup.model_file) in err


def test_gzipped_and_raw_idx_and_npy_layouts_agree(setup: Setup, capsys) -> None:
    root, images = setup.root, setup.images[2:]
    np.save(root / "flat.npy", images.reshape(len(images), 784))
    np.save(root / "square_int64.npy", images.astype(np.int64))
    np.save(root / "float32.npy", images.astype(np.float32).reshape(len(images), 784))
    results = []
    for name in ("images-idx3-ubyte.gz", "images-idx3-ubyte", "flat.npy", "square_int64.npy",
                 "float32.npy"):
        code, out, err = _cli(setup, capsys, root / name, "--json")
        assert code == 0, err
        results.append([(r["index"], r["predictions"]) for r in json.loads(out)])
    assert all(result == results[0] for result in results)
    assert [p[0]["class"] for _, p in results[0]] == setup.expected(images)


def test_top_k_in_json_and_table(setup: Setup, capsys) -> None:
    png, idx = setup.root / "coat.png", setup.root / "images-idx3-ubyte.gz"
    code, out, err = _cli(setup, capsys, png, idx, "--top-k", "3", "--json")
    assert code == 0, err
    records = json.loads(out)
    assert [(r["source"], r["index"]) for r in records] == [
        (str(png), None), *((str(idx), i) for i in range(4))]
    proba = setup.model.predict_proba(setup.images[[0, 2, 3, 4, 5]].reshape(-1, 784))
    for record, row in zip(records, proba, strict=True):
        ranked = record["predictions"]
        assert [p["label"] for p in ranked] == list(np.argsort(-row, kind="stable")[:3])
        assert [p["class"] for p in ranked] == [CLASS_NAMES[p["label"]] for p in ranked]
        assert [p["probability"] for p in ranked] == pytest.approx(np.sort(row)[::-1][:3])

    code, out, _ = _cli(setup, capsys, png, idx, "--top-k", "3")
    header, *rows = out.splitlines()
    assert code == 0 and "top 3 classes" in header
    first = records[0]["predictions"]
    assert rows[0].split(None, 1)[1].split(", ")[0].split() == [
        *first[0]["class"].split(), f"{first[0]['probability']:.4f}"]
    # The ranks form columns: each ", " separator sits at the same place on every row.
    separators = {tuple(i for i in range(len(row)) if row.startswith(", ", i)) for row in rows}
    assert len(separators) == 1 and len(next(iter(separators))) == 2


def _write(root: Path, name: str, content: bytes | np.ndarray | None) -> Path:
    path = root / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content, allow_pickle=True)
    return path


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.png", None, "file not found"),
    ("empty.png", b"", "unreadable image"),
    ("notes.bin", b"hello world", "bad magic number .*expected a PNG image, a .npy array or "
                                  "an IDX image file"),
    ("negative.npy", np.full((2, 784), -1), r"integers in 0\.\.255 \(int64\); image 0 has -1"),
    ("fraction.npy", np.full((1, 28, 28), 0.5), r"integers in 0\.\.255 \(float64\).* 0\.5"),
    ("nan.npy", np.full((1, 784), np.nan, dtype=np.float32), r"integers in 0\.\.255"),
    ("too_big.npy", np.full((1, 784), 256, dtype=np.uint16), r"image 0 has 256"),
    ("shape.npy", np.zeros((3, 10), dtype=np.uint8), r"shape \(3, 10\), expected \(n, 784\)"),
    ("none.npy", np.zeros((0, 784), dtype=np.uint8), "holds no images"),
    ("bool.npy", np.zeros((1, 784), dtype=bool), "dtype bool is not a pixel type"),
    ("objects.npy", np.array([None, 1]), "not a readable .npy array"),
])
def test_bad_input_names_the_file_and_the_problem(setup: Setup, capsys, tmp_path: Path,
                                                  name: str, content, message: str) -> None:
    path = _write(tmp_path, name, content)
    code, out, err = _cli(setup, capsys, setup.root / "coat.png", path)
    assert code == predict.EXIT_INPUT == 1
    assert out == ""
    assert err.startswith(f"predict: error: {path}: ")
    assert re.search(message, err), err


def test_every_bad_input_is_reported_at_once(setup: Setup, capsys, tmp_path: Path) -> None:
    rgb = write_png(tmp_path / "rgb.png", setup.images[0], mode="RGB")
    small = write_png(tmp_path / "small.png", np.zeros((14, 14), dtype=np.uint8))
    labels = tmp_path / "labels-idx1-ubyte"
    write_idx(labels, setup.labels)
    code, _, err = _cli(setup, capsys, rgb, small, labels, tmp_path)
    assert code == 1
    lines = err.removeprefix("predict: error: ").splitlines()
    assert lines[0] == f"{rgb}: image mode is 'RGB', expected 'L' (8-bit grayscale without " \
                       "alpha); convert it first, e.g. with Pillow's Image.convert('L')"
    assert lines[1] == f"{small}: image is 14x14 pixels, expected 28x28"
    assert lines[2].startswith(f"{labels}: holds labels") and "expected images" in lines[2]
    assert lines[3].startswith(f"{tmp_path}: is a folder")


def test_a_fifo_a_device_or_a_huge_file_is_refused_at_once(setup: Setup, capsys,
                                                            tmp_path: Path) -> None:
    fifo, zero, npy, huge = (tmp_path / name for name in ("x.png", "zero.png", "zero.npy",
                                                          "huge-idx3-ubyte"))
    os.mkfifo(fifo)  # no writer: reading it would hang
    zero.symlink_to("/dev/zero")  # reading it would fill the memory
    npy.symlink_to("/dev/zero")
    with open(huge, "wb") as f:
        f.truncate(2 << 30)  # 2 GB, sparse
    code, out, err = _cli(setup, capsys, fifo, zero, npy, huge)
    assert code == 1 and out == ""
    assert err.removeprefix("predict: error: ").splitlines() == [
        f"{fifo}: a FIFO; only regular files are read",
        f"{zero}: a character device; only regular files are read",
        f"{npy}: a character device; only regular files are read",
        f"{huge}: {2 << 30} bytes, more than the {512 << 20} bytes allowed for one file"]


def test_unusable_model_file(setup: Setup, capsys, tmp_path: Path) -> None:
    png = setup.root / "coat.png"
    code, _, err = run_main(capsys, png, "--model", tmp_path / "none.skops",
                            "--params", setup.params)
    assert code == predict.EXIT_MODEL == 3 and "none.skops not found" in err
    assert "--model takes models:/<name>@<alias>" in err and "train" not in err
    (tmp_path / "model.txt").write_text("not a model")
    code, _, err = run_main(capsys, png, "--model", tmp_path / "model.txt",
                            "--params", setup.params)
    assert code == 3 and "not a readable skops model file" in err and "models:/<name>" in err


@pytest.mark.parametrize("environment", [None, "sqlite:////nowhere/at/all.db"])
def test_missing_store(setup: Setup, capsys, tmp_path: Path, monkeypatch,
                       environment: str | None) -> None:
    """Refused before MLflow could create an empty store in the current directory."""
    monkeypatch.chdir(tmp_path)
    if environment is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", environment)
    code, _, err = run_main(capsys, setup.root / "coat.png", "--params", setup.params)
    where = tmp_path / "mlflow.db" if environment is None else Path("/nowhere/at/all.db")
    assert code == 3
    assert f"no MLflow store at {where}" in err and "make train" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_usage_and_parameter_errors(setup: Setup, capsys, tmp_path: Path) -> None:
    png = setup.root / "coat.png"
    for k in ("0", "11"):
        with pytest.raises(SystemExit) as exit_info:
            predict.main([str(png), "--top-k", k, "--params", str(setup.params)])
        assert exit_info.value.code == 2
        assert "--top-k must be between 1 and 10" in capsys.readouterr().err
    code, _, err = run_main(capsys, png, "--params", tmp_path / "params.yaml")
    assert code == 1 and "parameter file not found" in err


def test_command_line_starts_without_mlflow(setup: Setup) -> None:
    """A .skops model needs neither MLflow nor a store: the command stays quick."""
    argv = [str(setup.root / "bag.png"), "--model", str(setup.model_file),
            "--params", str(setup.params)]
    script = ("import sys; from pipeline import predict; "
              f"code = predict.main({argv!r}); print('mlflow' in sys.modules, code)")
    result = subprocess.run([sys.executable, "-c", script], cwd=setup.root, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False 0"
    assert setup.expected(setup.images[1:2])[0] in result.stdout


# --- The champion of a real registry, after `dvc repro` in a repository copy ----------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return trained_repo(tmp_path_factory)


def _predict_in(repo: Repo, *args: str) -> subprocess.CompletedProcess:
    return repo.run(sys.executable, "-m", "pipeline.predict", *args, check=False)


@pytest.mark.slow
def test_champion_by_default_agrees_with_the_evaluate_stage(repo: Repo) -> None:
    result = _predict_in(repo, f"data/raw/{TEST_IMAGES}", "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    with open(repo.root / "plots" / "predictions_test.csv", newline="") as f:
        evaluated = [row["predicted"] for row in csv.DictReader(f)]
    assert [r["index"] for r in records] == list(range(len(evaluated)))
    assert [r["predictions"][0]["class"] for r in records] == evaluated
    run_id = repo.json("models/run.json")["run_id"]
    assert (f"model models:/{MODEL_NAME}@champion (version 1, run {run_id})"
            in result.stderr)


@pytest.fixture
def mlflow_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo, after the test, what loading with MLflow in-process changes: the settings `main`
    sets for itself and the model's code folder that MLflow puts in front of sys.path."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for key, value in (("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
                       ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")):
        monkeypatch.setenv(key, value)


@pytest.fixture
def in_repo(repo: Repo, monkeypatch: pytest.MonkeyPatch, mlflow_defaults) -> Repo:
    """`main` in-process from the repository root, with its default store."""
    monkeypatch.chdir(repo.root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return repo


@pytest.mark.slow
def test_run_uri_gives_the_same_predictions_as_the_model_file(in_repo: Repo, capsys,
                                                              tmp_path: Path) -> None:
    with np.load(in_repo.root / "data" / "split" / "test.npz") as test:
        X = test["X"][::20]
    np.save(tmp_path / "some.npy", X)
    run_id = in_repo.json("models/run.json")["run_id"]
    code, out, err = run_main(capsys, tmp_path / "some.npy", "--model", f"runs:/{run_id}/model",
                              "--top-k", "2")
    assert code == 0, err
    model = model_loader.load(in_repo.root / "models" / "model.skops")
    shown = [row.split()[1] for row in out.splitlines()[1:]]
    assert shown == [CLASS_NAMES[label].split()[0] for label in model.predict(X)]


@pytest.mark.slow
@pytest.mark.parametrize(("uri", "message"), [
    (f"models:/{MODEL_NAME}@nope", f"'{MODEL_NAME}' has no alias 'nope' "
                                   "(aliases: champion -> version 1)"),
    (f"models:/{MODEL_NAME}/9", f"'{MODEL_NAME}' has no version 9 (versions: 1)"),
    ("models:/other@champion", "no registered model 'other' in sqlite:///"),
])
def test_unknown_alias_version_or_name(in_repo: Repo, capsys, uri: str, message: str) -> None:
    code, out, err = run_main(capsys, f"data/raw/{TEST_IMAGES}", "--model", uri)
    assert code == 3 and out == ""
    assert message in err


@pytest.mark.slow
def test_no_champion_yet(setup: Setup, capsys, tmp_path: Path, monkeypatch,
                         mlflow_defaults) -> None:
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=store, registry_uri=store).create_registered_model(MODEL_NAME)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    code, _, err = run_main(capsys, setup.root / "coat.png", "--params", setup.params)
    assert code == 3
    assert f"no champion yet for '{MODEL_NAME}' in {store}: run `make train`" in err


# --- The real data ---------------------------------------------------------------------------


def _real_archives() -> Path:
    names = [spec.name for spec in config.load(REPO_ROOT / "params.yaml").data.files.values()]
    directory = mirror_directory(REPO_ROOT)  # the download stage's own rule
    if directory is not None and all((directory / name).is_file() for name in names):
        return directory
    pytest.skip("real Fashion-MNIST archives not found in FMNIST_MIRROR nor "
                "../shared/fashion-mnist beside the checkout")


@pytest.mark.slow
@pytest.mark.real_data
def test_real_test_images_get_the_evaluate_stage_classes(tmp_path: Path) -> None:
    """10,000 real images, 15% of them misclassified: the same mistakes, image by image."""
    real = _real_archives()
    cfg = config.load(REPO_ROOT / "params.yaml")
    model = estimators.build(cfg.model)
    model.fit(read_idx(real / "train-images-idx3-ubyte.gz").reshape(-1, 784),
              read_idx(real / "train-labels-idx1-ubyte.gz"))
    model_files.save(model, tmp_path / "model.skops")

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", str(real / TEST_IMAGES), "--json",
         "--model", str(tmp_path / "model.skops"), "--params", str(REPO_ROOT / "params.yaml")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    shown = [record["predictions"][0] for record in json.loads(result.stdout)]

    X = read_idx(real / TEST_IMAGES).reshape(-1, 784)
    proba = model.predict_proba(X)
    names = np.asarray(cfg.data.class_names)
    evaluate_stage = names[proba.argmax(axis=1)]  # what pipeline.evaluate writes per image
    assert [p["class"] for p in shown] == evaluate_stage.tolist()
    assert [p["label"] for p in shown] == model.predict(X).tolist()
    assert [p["probability"] for p in shown] == pytest.approx(proba.max(axis=1))
    accuracy = np.mean(model.predict(X) == read_idx(real / "t10k-labels-idx1-ubyte.gz"))
    assert 0.8 < accuracy < 0.95


def _swapped_params(repo: Repo, destination: Path) -> Path:
    """The repository's params.yaml with the first two class names swapped."""
    params = yaml.safe_load((repo.root / "params.yaml").read_text())
    names = params["data"]["class_names"]
    names[0], names[1] = names[1], names[0]
    destination.write_text(yaml.safe_dump(params, sort_keys=False))
    return destination


@pytest.mark.slow
@pytest.mark.parametrize("model", ["champion", "run"])
def test_the_model_names_its_classes_and_differing_params_are_reported(
        repo: Repo, tmp_path: Path, model: str) -> None:
    """Swapping two of params.yaml's class names once relabelled every answer of the champion."""
    params = _swapped_params(repo, tmp_path / "params.yaml")
    with np.load(repo.root / "data" / "split" / "test.npz") as test:
        X = test["X"][::10]
    np.save(tmp_path / "some.npy", X)
    uri = ([] if model == "champion"
           else ["--model", f"runs:/{repo.json('models/run.json')['run_id']}/model"])
    result = _predict_in(repo, str(tmp_path / "some.npy"), "--json", "--params", str(params),
                         *uri)
    assert result.returncode == 0, result.stderr
    labels = model_loader.load(repo.root / "models" / "model.skops").predict(X)
    trained = yaml.safe_load((repo.root / "params.yaml").read_text())["data"]["class_names"]
    records = json.loads(result.stdout)
    assert [r["predictions"][0]["class"] for r in records] == [trained[i] for i in labels]
    assert {0, 1} & set(labels.tolist())  # the swapped names would show
    assert "warning: data.class_names in" in result.stderr and "using the model's" in result.stderr


@pytest.mark.slow
def test_a_bare_skops_file_is_named_by_the_parameter_file(repo: Repo, tmp_path: Path) -> None:
    params = _swapped_params(repo, tmp_path / "params.yaml")
    with np.load(repo.root / "data" / "split" / "test.npz") as test:
        X = test["X"][::10]
    np.save(tmp_path / "some.npy", X)
    result = _predict_in(repo, str(tmp_path / "some.npy"), "--json", "--params", str(params),
                         "--model", "models/model.skops")
    assert result.returncode == 0, result.stderr
    names = yaml.safe_load(params.read_text())["data"]["class_names"]
    labels = model_loader.load(repo.root / "models" / "model.skops").predict(X)
    assert [r["predictions"][0]["class"] for r in json.loads(result.stdout)] == [
        names[i] for i in labels]
    assert "warning" not in result.stderr


@pytest.mark.parametrize("name", ["bomb", "padded", "animated", "transparent"])
def test_predict_refuses_animated_oversized_and_transparent_pngs(setup: Setup, capsys,
                                                                 tmp_path: Path,
                                                                 name: str) -> None:
    from tests.test_labelled_images import crafted_pngs

    path, reason = crafted_pngs(tmp_path)[name]
    code, out, err = _cli(setup, capsys, path)
    assert code == 1 and out == "", err
    assert err.startswith(f"predict: error: {path}: ")
    assert reason in err and len(err.strip().splitlines()) == 1
