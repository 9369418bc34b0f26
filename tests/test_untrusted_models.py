"""Nothing is unpickled: a pickled model in the tracking store is refused before it is read.

A crafted model, logged with `serialization_format="cloudpickle"` to a real sqlite store and
registry, holds an object whose `__reduce__` runs `touch <marker>`. Whether reached through the
champion alias, a version, its run or a downloaded model folder, predict and serve refuse it,
name the URI and the format, and the marker never appears.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.estimator import SoftmaxRegression
from pipeline.support import model_files, model_loader
from tests.repo_copy import MODEL_NAME
from tests.synthetic import REPO_ROOT, data_params, make_dataset, write_params

LOG_CRAFTED_MODEL = textwrap.dedent("""
    import os, sys
    import mlflow, mlflow.sklearn
    from sklearn.dummy import DummyClassifier
    import numpy as np

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[2],))

    mlflow.set_tracking_uri(sys.argv[1])
    classifier = DummyClassifier().fit(np.zeros((4, 784)), [0, 1, 0, 1])
    classifier.payload = RunsCode()
    with mlflow.start_run() as run:
        mlflow.sklearn.log_model(classifier, name="model", serialization_format="cloudpickle",
                                 registered_model_name=sys.argv[3])
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(sys.argv[3], "champion", "1")
    mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=sys.argv[4])
    print(run.info.run_id)
""")


@dataclass
class CraftedStore:
    root: Path
    tracking_uri: str
    run_id: str
    folder: Path  # the model downloaded as a local MLflow model folder
    marker: Path
    params: Path
    images: Path

    def env(self) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                "MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
                "PYTHONPATH": str(REPO_ROOT)}

    def run(self, module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=self.root,
                              env=self.env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory, archives) -> CraftedStore:
    root = tmp_path_factory.mktemp("crafted")
    marker = root / "code-ran"
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    logged = subprocess.run(
        [sys.executable, "-c", LOG_CRAFTED_MODEL, tracking_uri, str(marker), MODEL_NAME,
         str(root / "downloaded")],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
             "MLFLOW_DISABLE_TELEMETRY": "true"}, capture_output=True, text=True, timeout=300)
    assert logged.returncode == 0, logged.stderr[-3000:]
    marker.unlink(missing_ok=True)  # MLflow itself may load what it has just logged
    X, _ = make_dataset(2, seed=1)
    np.save(root / "images.npy", X.reshape(len(X), 784))
    return CraftedStore(root, tracking_uri, logged.stdout.split()[-1],
                        root / "downloaded" / "model", marker,
                        write_params(root / "params.yaml", data_params(archives.specs)),
                        root / "images.npy")


def _uris(crafted: CraftedStore) -> dict[str, str]:
    return {"alias": f"models:/{MODEL_NAME}@champion", "version": f"models:/{MODEL_NAME}/1",
            "run": f"runs:/{crafted.run_id}/model", "folder": str(crafted.folder)}


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["alias", "version", "run", "folder"])
def test_predict_refuses_a_pickled_model(crafted: CraftedStore, reference: str) -> None:
    uri = _uris(crafted)[reference]
    result = crafted.run("pipeline.predict", str(crafted.images), "--model", uri,
                         "--params", str(crafted.params))
    assert result.returncode == 3, result.stdout + result.stderr
    assert not crafted.marker.exists(), "the pickled model ran its code"
    assert uri.split("@")[0] in result.stderr and "'cloudpickle', not 'skops'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_pickle_file_itself_is_refused(crafted: CraftedStore) -> None:
    result = crafted.run("pipeline.predict", str(crafted.images),
                         "--model", str(crafted.folder / "model.pkl"),
                         "--params", str(crafted.params))
    assert result.returncode == 3
    assert f"{crafted.folder / 'model.pkl'} is not a readable skops model file" in result.stderr
    assert not crafted.marker.exists()


@pytest.mark.slow
def test_serve_refuses_the_pickled_champion_before_starting(crafted: CraftedStore) -> None:
    result = crafted.run("pipeline.commands.serve", "--port", "1", "--params",
                         str(crafted.params))
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"models:/{MODEL_NAME}@champion is version 1" in result.stderr
    assert "'cloudpickle', not 'skops'" in result.stderr
    assert "/ping" not in result.stdout  # the server was never started
    assert not crafted.marker.exists()


@pytest.mark.slow
def test_the_loader_checks_the_mlmodel_file_before_downloading_the_model(
        crafted: CraftedStore) -> None:
    with pytest.raises(model_loader.UntrustedModelError, match="cloudpickle"):
        model_loader.load_model_uri(f"runs:/{crafted.run_id}/model", crafted.tracking_uri)
    assert not crafted.marker.exists()


@pytest.mark.parametrize("flavors, found", [
    ({"python_function": {"loader_module": "mlflow.pyfunc.model"}}, "flavors: python_function"),
    ({"sklearn": {"serialization_format": "pickle", "pickled_model": "model.pkl"}}, "'pickle'"),
    ({"sklearn": {"serialization_format": "skops", "pickled_model": "model.skops",
                  "skops_trusted_types": ["builtins.eval"]}}, "builtins.eval"),
    ({"sklearn": {"serialization_format": "skops", "pickled_model": "model.skops"},
      "python_function": {"loader_module": "mlflow.pyfunc.model"}}, "mlflow.pyfunc.model"),
    ({"sklearn": {"serialization_format": "skops", "pickled_model": "../../etc/passwd"}},
     "no usable model file"),
])
def test_what_an_mlmodel_file_may_declare(flavors: dict, found: str) -> None:
    with pytest.raises(model_loader.UntrustedModelError, match="models:/m/1") as refused:
        model_loader.trusted_model_file("models:/m/1", flavors)
    assert found in str(refused.value)


@pytest.mark.slow
def test_a_model_the_pipeline_logged_loads(tmp_path: Path) -> None:
    import mlflow
    import mlflow.sklearn

    X, y = make_dataset(10, seed=2)
    X = X.reshape(len(X), 784)
    estimator = SoftmaxRegression(epochs=2, random_state=0).fit(X, y)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient().create_experiment("loader")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.sklearn.log_model(estimator, name="model", serialization_format="skops",
                                 skops_trusted_types=model_files.TRUSTED_TYPES)
    loaded = model_loader.load_model_uri(f"runs:/{run.info.run_id}/model", uri)
    assert np.array_equal(loaded.predict(X), estimator.predict(X))


@pytest.mark.parametrize("loader", ["pipeline.support.model_loader", "pipeline.support.serving"])
def test_versions_logged_with_either_loader_name_load(tmp_path: Path, loader: str) -> None:
    """Versions logged before the loader moved name `pipeline.support.serving` in their MLmodel:
    MLflow's pyfunc loader and serve's checked loader still load them."""
    import mlflow
    import yaml

    from pipeline.support import pyfunc_model

    X, y = make_dataset(10, seed=3)
    X = X.reshape(len(X), 784)
    estimator = SoftmaxRegression(epochs=2, random_state=0).fit(X, y)
    folder = tmp_path / "model"
    pyfunc_model.save_model(estimator, str(folder), mlflow.models.Model(),
                            class_names=[f"c{i}" for i in range(10)],
                            skops_trusted_types=model_files.TRUSTED_TYPES)
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    assert meta["flavors"]["python_function"]["loader_module"] == pyfunc_model.LOADER_MODULE
    meta["flavors"]["python_function"]["loader_module"] = loader
    (folder / "MLmodel").write_text(yaml.safe_dump(meta))
    expected = [f"c{label}" for label in estimator.predict(X)]
    pyfunc = mlflow.pyfunc.load_model(str(folder))
    assert pyfunc.predict(X)["class_name"].tolist() == expected
    served = model_loader.load_served_model(str(folder))
    assert served.predict(X)["class_name"].tolist() == expected


# --- A model the pipeline logged, then tampered with in the store -------------------------------

LOG_PIPELINE_MODELS = textwrap.dedent("""
    import sys
    import mlflow
    import numpy as np
    from pipeline.core.estimator import SoftmaxRegression
    from pipeline.support import pyfunc_model

    mlflow.set_tracking_uri(sys.argv[1])
    X = np.random.default_rng(0).integers(0, 256, (40, 784)).astype(np.uint8)
    estimator = SoftmaxRegression(epochs=1, random_state=0).fit(X, np.arange(40) % 10)
    for name in sys.argv[2:]:
        with mlflow.start_run():
            info = pyfunc_model.log_model(estimator, [f"c{i}" for i in range(10)],
                                          registered_model_name=name)
        print(name, mlflow.MlflowClient().get_model_version(name, "1").source)
""")


@dataclass
class TamperedStore:
    crafted: CraftedStore  # its params and images
    tracking_uri: str
    folders: dict[str, Path]  # registered name -> the version's folder in the store

    def run(self, module: str, *args: str) -> subprocess.CompletedProcess:
        env = {**self.crafted.env(), "MLFLOW_TRACKING_URI": self.tracking_uri}
        return subprocess.run([sys.executable, "-m", module, *args, "--params",
                               str(self.crafted.params)], cwd=self.crafted.root, env=env,
                              capture_output=True, text=True, timeout=120)


def _artifact_folder(root: Path) -> Path:
    """The version's folder on disk: the newest folder under the store holding an MLmodel."""
    return max((path.parent for path in root.rglob("MLmodel")), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory, crafted: CraftedStore) -> TamperedStore:
    root = tmp_path_factory.mktemp("tampered")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    folders = {}
    for name in ("yaml-tag", "link-out"):
        logged = subprocess.run(
            [sys.executable, "-c", LOG_PIPELINE_MODELS, tracking_uri, name], cwd=root,
            env={**crafted.env(), "MLFLOW_TRACKING_URI": tracking_uri},
            capture_output=True, text=True, timeout=300)
        assert logged.returncode == 0, logged.stderr[-3000:]
        folders[name] = _artifact_folder(root)
    assert len(set(folders.values())) == 2
    # A YAML tag that would build a Python object, in the MLmodel file of version 1.
    mlmodel = folders["yaml-tag"] / "MLmodel"
    mlmodel.write_text(mlmodel.read_text() + "hostile: !!python/object/apply:os.system ['true']\n")
    # The skops file replaced by a symlink to a copy outside the model's folder.
    skops_file = folders["link-out"] / "model.skops"
    outside = root / "outside.skops"
    skops_file.rename(outside)
    skops_file.symlink_to(outside)
    return TamperedStore(crafted, tracking_uri, folders)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["pipeline.predict", "pipeline.commands.serve"])
def test_a_python_object_tag_in_mlmodel_gets_one_line_and_exit_3(tampered: TamperedStore,
                                                                 command: str) -> None:
    args = ([str(tampered.crafted.images)] if command == "pipeline.predict" else ["--port", "1"])
    result = tampered.run(command, *args, "--model", "models:/yaml-tag/1")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "/ping" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "models:/yaml-tag/1" in result.stderr and "MLmodel" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["pipeline.predict", "pipeline.commands.serve"])
def test_a_model_file_linked_out_of_its_folder_is_refused(tampered: TamperedStore,
                                                          command: str) -> None:
    args = ([str(tampered.crafted.images)] if command == "pipeline.predict" else ["--port", "1"])
    result = tampered.run(command, *args, "--model", "models:/link-out/1")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "/ping" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "symlink" in result.stderr and "model.skops" in result.stderr


def test_the_registry_readers_local_files_stay_in_the_folder(tmp_path: Path) -> None:
    from pipeline.support import registry_reader

    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret").write_bytes(b"outside")
    (folder / "inside").write_bytes(b"inside")
    (folder / "link-in").symlink_to(folder / "inside")
    (folder / "link-out").symlink_to(tmp_path / "secret")
    read = registry_reader.local_reader(folder)
    assert read("link-in", 100) == b"inside"
    with pytest.raises(registry_reader.RegistryError, match="symlink out of"):
        read("link-out", 100)
    with pytest.raises(registry_reader.RegistryError, match="out of"):
        read("../secret", 100)
