"""SoftmaxRegression: correct gradients, reproducible training, clear errors, skops-safe state.

Everything here runs on small synthetic data; the accuracy/time bar on the real Fashion-MNIST is
checked by `benchmarks/bench_softmax.py`, never by a timed test.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from pipeline.core import estimator, preprocessing
from pipeline.core.estimator import (
    HISTORY_KEYS,
    SoftmaxRegression,
    TrainingDivergedError,
    loss_and_gradients,
)
from pipeline.core.preprocessing import PixelFeatures
from pipeline.core.softmax import cross_entropy

N_FEATURES = 20


def blobs(n_samples=300, n_classes=3, n_features=N_FEATURES, spread=1.0, seed=0):
    """Gaussian clusters on well separated centres, as float64."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(n_classes, n_features))
    labels = rng.integers(n_classes, size=n_samples)
    return centres[labels] + rng.normal(scale=spread, size=(n_samples, n_features)), labels


def fake_images(n_samples=400, n_classes=4, seed=0):
    """uint8 "images" whose classes differ in which pixels are bright, like Fashion-MNIST."""
    templates = np.random.default_rng(0).random((n_classes, 64)) < 0.3
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(n_classes, size=n_samples)
    noise = rng.integers(0, 90, size=(n_samples, 64))
    images = np.where(templates[labels], 255 - noise, noise).astype(np.uint8)
    return images, labels


FAST = {"epochs": 15, "batch_size": 32, "learning_rate": 0.01}


# ---------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_gradient_matches_finite_differences(l2):
    rng = np.random.default_rng(1)
    n_samples, n_features, n_classes = 7, 5, 4
    X = rng.normal(size=(n_samples, n_features))
    labels = rng.integers(n_classes, size=n_samples)
    coef = rng.normal(size=(n_classes, n_features))
    intercept = rng.normal(size=n_classes)

    loss, grad_coef, grad_intercept = loss_and_gradients(coef, intercept, X, labels, l2)

    expected_loss = cross_entropy(X @ coef.T + intercept, labels) + 0.5 * l2 * np.sum(coef**2)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    step = 1e-6
    for params, analytic in ((coef, grad_coef), (intercept, grad_intercept)):
        numeric = np.zeros_like(params)
        for index in np.ndindex(params.shape):
            original = params[index]
            params[index] = original + step
            loss_up = loss_and_gradients(coef, intercept, X, labels, l2)[0]
            params[index] = original - step
            loss_down = loss_and_gradients(coef, intercept, X, labels, l2)[0]
            params[index] = original
            numeric[index] = (loss_up - loss_down) / (2 * step)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_gradient_kernel_works_in_float32():
    X, labels = blobs(50, n_features=6)
    coef = np.zeros((3, 6), dtype=np.float32)
    intercept = np.zeros(3, dtype=np.float32)
    loss, grad_coef, grad_intercept = loss_and_gradients(
        coef, intercept, X.astype(np.float32), labels
    )
    assert loss == pytest.approx(math.log(3), rel=1e-6)
    assert grad_coef.dtype == np.float32 and grad_intercept.dtype == np.float32


@pytest.mark.parametrize("n_samples", [31, 32, 64, 65, 100, 131, 1600, 2113])
def test_gradients_of_blocked_products_match_the_plain_products(n_samples):
    """The kernel multiplies in blocks of rows (and a remainder) within each part of a batch;
    whatever the batch size, its loss and gradients are those of one plain product."""
    rng = np.random.default_rng(n_samples)
    X = rng.normal(size=(n_samples, 9))
    labels = rng.integers(4, size=n_samples)
    coef, intercept = rng.normal(size=(4, 9)), rng.normal(size=4)
    loss, grad_coef, grad_intercept = loss_and_gradients(coef, intercept, X, labels)

    logits = X @ coef.T + intercept
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    probabilities[np.arange(n_samples), labels] -= 1.0
    assert loss == pytest.approx(cross_entropy(logits, labels), rel=1e-12)
    np.testing.assert_allclose(grad_coef, probabilities.T @ X / n_samples, rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(grad_intercept, probabilities.sum(axis=0) / n_samples,
                               rtol=1e-10, atol=1e-14)


def test_a_full_batch_holds_few_partial_gradients():
    """The blocks' partial gradients are summed in groups: a full-batch fit of 60,000 images
    holds 1.6 MB of them per part, not 176 MB."""
    kernel = estimator._BatchGradients(10, 2352, 60_000, np.float32)
    assert sum(partials.nbytes for partials in kernel.partial_grads) < 4 * 2**20


def test_folded_scaling_trains_on_unscaled_features_with_the_scaled_weights():
    """Logits and gradients from unscaled features through the folded weights are those of the
    standardised features with the weights themselves."""
    rng = np.random.default_rng(5)
    X = rng.random((80, 12)).astype(np.float32)
    labels = rng.integers(3, size=80)
    mean = X.mean(axis=0)
    scale = X.std(axis=0) + np.float32(0.1)
    coef = rng.normal(size=(3, 12)).astype(np.float32)
    intercept = rng.normal(size=3).astype(np.float32)
    fold = estimator._FoldedScaling(mean, scale, 3)

    scaled_loss, scaled_grad_coef, scaled_grad_intercept = loss_and_gradients(
        coef, intercept, (X - mean) / scale, labels)
    unscaled_loss, grad_coef, grad_intercept = loss_and_gradients(
        *fold.weights(coef, intercept), X, labels)
    fold.gradients(grad_coef, grad_intercept)
    assert unscaled_loss == pytest.approx(scaled_loss, rel=1e-5)
    np.testing.assert_allclose(grad_coef, scaled_grad_coef, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_intercept, scaled_grad_intercept, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- training


def test_separable_problem_is_learned_perfectly():
    X, y = blobs(spread=0.5)
    model = SoftmaxRegression(hinges=0, **FAST).fit(X, y)
    assert model.score(X, y) == 1.0
    assert model.coef_.shape == (3, N_FEATURES) and model.intercept_.shape == (3,)
    assert model.coef_.dtype == np.float32
    assert model.n_features_in_ == N_FEATURES
    assert model.classes_.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "params",
    [
        {"optimizer": "sgd", "learning_rate": 0.05, "nesterov": True},
        {"optimizer": "sgd", "learning_rate": 0.05, "nesterov": False},
        {"optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.0},
        {"optimizer": "adam", "learning_rate": 0.01, "lr_schedule": "constant"},
        {"optimizer": "adam", "learning_rate": 0.01, "lr_schedule": "step"},
        {"optimizer": "adam", "learning_rate": 0.01, "scaling": "minmax",
         "pixel_transform": None},
        {"optimizer": "adam", "learning_rate": 0.01, "pixel_transform": "sqrt"},
        {"optimizer": "adam", "learning_rate": 0.01, "hinges": 0},
        {"optimizer": "adam", "learning_rate": 0.01, "hinges": 3, "scaling": "minmax"},
    ],
)
def test_optimizers_schedules_and_preprocessing_all_learn(params):
    X, y = fake_images()
    X_test, y_test = fake_images(seed=1)
    model = SoftmaxRegression(epochs=10, batch_size=32, **params).fit(X, y)
    assert model.score(X_test, y_test) > 0.95
    losses = [record["train_loss"] for record in model.history_]
    assert losses[-1] < losses[0]


def test_learning_rate_schedules():
    X, y = blobs(64)
    rates = {}
    for schedule in ("constant", "cosine", "step"):
        model = SoftmaxRegression(
            lr_schedule=schedule, learning_rate=0.1, epochs=8, batch_size=64
        ).fit(X, y)
        rates[schedule] = [record["lr"] for record in model.history_]
    assert rates["constant"] == [0.1] * 8
    assert rates["step"] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    cosine = rates["cosine"]
    assert cosine[0] == 0.1 and all(a > b for a, b in zip(cosine, cosine[1:], strict=False))


def test_same_seed_gives_identical_weights():
    X, y = fake_images()
    first = SoftmaxRegression(random_state=3, **FAST).fit(X, y)
    second = SoftmaxRegression(random_state=3, **FAST).fit(X, y)
    other = SoftmaxRegression(random_state=4, **FAST).fit(X, y)
    np.testing.assert_array_equal(first.coef_, second.coef_)
    np.testing.assert_array_equal(first.intercept_, second.intercept_)
    assert not np.array_equal(first.coef_, other.coef_)


@pytest.mark.parametrize("blas_threads", [1, 4])
def test_weights_do_not_depend_on_threads(monkeypatch, blas_threads):
    """The same bits whether the batch halves and the feature chunks run on two threads or one
    after the other, and whatever BLAS threads the caller set: model files must not depend on
    the machine's cores."""
    X, y = fake_images(2500)  # three row chunks of preprocessing
    params = {"random_state": 1, "batch_size": 97, "epochs": 2}
    for module in (estimator, preprocessing):
        monkeypatch.setattr(module, "spare_core", lambda: True)
    parallel = SoftmaxRegression(**params).fit(X, y)
    for module in (estimator, preprocessing):
        monkeypatch.setattr(module, "spare_core", lambda: False)
    with threadpool_limits(blas_threads, user_api="blas"):
        serial = SoftmaxRegression(**params).fit(X, y)
    assert parallel.coef_.tobytes() == serial.coef_.tobytes()
    assert parallel.intercept_.tobytes() == serial.intercept_.tobytes()
    assert parallel.history_ == serial.history_


def test_pixel_features_learn_their_statistics_without_building_the_features():
    """fit counts pixel values instead of materialising 12 bytes of features per pixel (the
    estimator then builds the features once, in its shuffled order)."""
    X = np.random.default_rng(0).integers(0, 256, (20_000, 784), dtype=np.uint8)
    feature_bytes = X.size * 3 * 4
    tracemalloc.start()
    try:
        fitted = PixelFeatures().fit(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < feature_bytes / 4
    as_floats = preprocessing.transform_pixels(X, "power", 0.25, 2).astype(np.float64)
    np.testing.assert_allclose(fitted.mean_, as_floats.mean(axis=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("as_floats", [False, True])
def test_features_and_statistics_in_one_pass_match_the_separate_steps(as_floats):
    """The one pass the estimator makes gives the rows asked for, in their order, unscaled, and
    the statistics PixelFeatures.fit learns, to the bit."""
    X = np.random.default_rng(2).integers(0, 256, (2500, 30), dtype=np.uint8)
    X[:, 3] = 7  # a constant pixel: std floored
    rows = np.random.default_rng(3).permutation(2500)
    data = X.astype(np.float64) + (0.5 if as_floats else 0.0)
    features, mean, scale = preprocessing.features_and_statistics(data, "power", 0.3, 2, rows)
    np.testing.assert_array_equal(features,
                                  preprocessing.transform_pixels(data[rows], "power", 0.3, 2))
    expected_mean, expected_scale = preprocessing.feature_statistics(data, "power", 0.3, 2)
    if as_floats:  # summed from the features rather than counted: the same to rounding
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(scale, expected_scale, rtol=1e-5)
    else:
        assert mean.tobytes() == expected_mean.tobytes()
        assert scale.tobytes() == expected_scale.tobytes()
    assert scale[9] == np.float32(preprocessing.STD_FLOOR)  # pixel 3's power feature


@pytest.mark.parametrize("hinges", [0, 2])
def test_uint8_and_float_pixels_give_identical_results(hinges):
    """uint8 input takes a lookup-table path; it must match the arithmetic path exactly."""
    X, y = fake_images()
    params = {"pixel_transform": "power", "power": 0.37, "hinges": hinges, **FAST}
    from_uint8 = SoftmaxRegression(**params).fit(X, y)
    from_float = SoftmaxRegression(**params).fit(X.astype(np.float64), y)
    np.testing.assert_array_equal(from_uint8.coef_, from_float.coef_)
    np.testing.assert_array_equal(
        from_uint8.predict_proba(X), from_float.predict_proba(X.astype(np.float32))
    )


def test_hinge_features_are_functions_of_one_pixel_each():
    """The model stays additive: pixel p's features are p's power and max(x/255 - k, 0)."""
    X, _ = fake_images(20)
    features = PixelFeatures(hinges=3, scaling="minmax", power=0.5).fit_transform(X)
    assert features.shape == (20, 64 * 4)
    per_pixel = features.reshape(20, 64, 4)
    x = X / 255.0
    np.testing.assert_allclose(per_pixel[..., 0], x**0.5, rtol=1e-6)
    for j, knot in enumerate((0.25, 0.5, 0.75), start=1):
        np.testing.assert_allclose(per_pixel[..., j], np.maximum(x - knot, 0), atol=1e-6)
    changed = X.copy()
    changed[:, 5] = 255 - changed[:, 5]
    moved = PixelFeatures(hinges=3, scaling="minmax", power=0.5).fit_transform(changed)
    differs = np.flatnonzero((moved != features).any(axis=0))
    assert set(differs // 4) == {5}


def test_model_files_from_before_hinges_still_load(tmp_path):
    """A PixelFeatures saved without `hinges` (older model files) predicts as it did."""
    X, y = fake_images()
    model = SoftmaxRegression(hinges=0, **FAST).fit(X, y)
    del model.features_.__dict__["hinges"]
    path = tmp_path / "old.skops"
    sio.dump(model, path)
    loaded = sio.load(path, trusted=sio.get_untrusted_types(file=path))
    assert loaded.features_.hinges == 0
    model.features_.hinges = 0
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_standardisation_statistics_are_learned_from_transformed_pixels():
    X, y = fake_images()
    model = SoftmaxRegression(epochs=1, pixel_transform="sqrt", hinges=0).fit(X, y)
    transformed = np.sqrt(X / 255.0)
    np.testing.assert_allclose(model.features_.mean_, transformed.mean(axis=0), rtol=1e-5)
    expected_scale = np.maximum(transformed.std(axis=0), 0.05)
    np.testing.assert_allclose(model.features_.scale_, expected_scale, rtol=1e-4)

    minmax = SoftmaxRegression(epochs=1, scaling="minmax", hinges=0).fit(X, y)
    assert minmax.features_.mean_ is None and minmax.features_.scale_ is None


def test_negative_inputs_stay_finite_under_the_power_transform():
    X, y = blobs()
    model = SoftmaxRegression(pixel_transform="power", power=0.3, **FAST).fit(X - 100, y)
    assert np.isfinite(model.coef_).all()
    assert np.isfinite(model.predict_proba(X - 100)).all()


def test_string_labels():
    X, y = blobs()
    names = np.array(["coat", "sandal", "shirt"])[y]
    model = SoftmaxRegression(**FAST).fit(X, names)
    assert model.classes_.tolist() == ["coat", "sandal", "shirt"]
    assert set(model.predict(X)) <= set(names)
    assert model.predict_proba(X).shape == (len(X), 3)


def test_probabilities_and_decision_function_are_consistent():
    X, y = blobs()
    model = SoftmaxRegression(**FAST).fit(X, y)
    probabilities = model.predict_proba(X)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(model.predict_log_proba(X), np.log(probabilities), atol=1e-10)
    np.testing.assert_array_equal(model.decision_function(X).argmax(axis=1), model.predict(X))

    binary = SoftmaxRegression(**FAST).fit(X, y == 0)
    decision = binary.decision_function(X)
    assert decision.shape == (len(X),)
    np.testing.assert_array_equal(decision > 0, binary.predict(X))


# ---------------------------------------------------------------------------- history, stopping


def test_history_without_validation():
    X, y = blobs()
    seen = []
    model = SoftmaxRegression(epochs=4).fit(X, y, callback=seen.append)
    assert len(model.history_) == model.n_iter_ == model.best_epoch_ == 4
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in seen] == model.history_
    assert all(record["seconds"] >= 0 for record in seen)
    for number, record in enumerate(model.history_, start=1):
        assert tuple(record) == HISTORY_KEYS
        assert record["epoch"] == number
        assert record["val_loss"] is None and record["val_accuracy"] is None
        assert isinstance(record["train_loss"], float) and record["train_loss"] > 0
        assert 0 <= record["train_accuracy"] <= 1
        assert record["lr"] > 0


def test_history_with_eval_set():
    X, y = blobs()
    X_val, y_val = blobs(seed=0, n_samples=100)
    model = SoftmaxRegression(epochs=3).fit(X, y, eval_set=(X_val, y_val))
    last = model.history_[-1]
    assert tuple(last) == HISTORY_KEYS
    assert last["val_accuracy"] == pytest.approx(model.score(X_val, y_val))
    expected_loss = -np.mean(np.log(model.predict_proba(X_val)[np.arange(100), y_val]))
    assert last["val_loss"] == pytest.approx(expected_loss, rel=1e-4)


def overfitting_problem():
    """Few noisy samples and many features: the validation loss turns up after a few epochs."""
    rng = np.random.default_rng(0)
    n_features = 200
    direction = rng.normal(size=n_features)

    def sample(n):
        X = rng.normal(size=(n, n_features))
        y = (X @ direction + rng.normal(scale=15.0, size=n) > 0).astype(int)
        return X, y

    return sample(60), sample(500)


def test_early_stopping_restores_the_best_weights():
    (X, y), (X_val, y_val) = overfitting_problem()
    params = {"epochs": 60, "batch_size": 10, "learning_rate": 0.01, "lr_schedule": "constant",
              "l2": 0.0, "early_stopping": True, "patience": 3}
    model = SoftmaxRegression(**params).fit(X, y, eval_set=(X_val, y_val))

    val_losses = [record["val_loss"] for record in model.history_]
    assert model.n_iter_ < 60, "the problem should trigger early stopping"
    assert model.best_epoch_ == int(np.argmin(val_losses)) + 1
    assert model.n_iter_ == model.best_epoch_ + 3
    restored_loss = -np.mean(np.log(model.predict_proba(X_val)[np.arange(len(y_val)), y_val]))
    assert restored_loss == pytest.approx(min(val_losses), rel=1e-4)
    assert restored_loss < val_losses[-1]


def test_early_stopping_without_eval_set_holds_out_validation_data():
    X, y = blobs()
    model = SoftmaxRegression(early_stopping=True, validation_fraction=0.2, epochs=5).fit(X, y)
    assert all(record["val_loss"] is not None for record in model.history_)
    assert 1 <= model.best_epoch_ <= model.n_iter_


# ---------------------------------------------------------------------------- errors


def test_divergence_raises_a_clear_error_and_leaves_no_fitted_state():
    X, y = blobs()
    model = SoftmaxRegression(**FAST).fit(X, y)
    model.set_params(optimizer="sgd", learning_rate=1e30, lr_schedule="constant",
                     scaling="minmax", pixel_transform=None)
    seen = []
    with pytest.raises(TrainingDivergedError, match=r"epoch 1.*lower learning_rate"):
        model.fit(X * 1e6, y, callback=seen.append)
    assert issubclass(TrainingDivergedError, ValueError)
    assert seen == []
    # Neither NaN weights nor the previous fit's weights survive a failed fit.
    assert not [name for name in vars(model) if name.endswith("_")]
    with pytest.raises(NotFittedError):
        model.predict(X)


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        (np.zeros(10), np.zeros(10), "2D array"),
        (np.full((4, 3), np.nan), [0, 1, 0, 1], "NaN"),
        (np.full((4, 3), np.inf), [0, 1, 0, 1], "infinity"),
        (np.zeros((4, 3)), [0.5, 1.5, 0.2, 1.0], "Unknown label type"),
        (np.zeros((4, 3)), [1, 1, 1, 1], "one class"),
        (np.zeros((4, 3)), [0, 1, 0], "inconsistent numbers of samples"),
        (np.zeros((0, 3)), [], "0 sample"),
    ],
)
def test_bad_training_data_raises_value_error(X, y, message):
    with pytest.raises(ValueError, match=message):
        SoftmaxRegression(epochs=1).fit(X, y)


def test_feature_count_must_match_fit():
    X, y = blobs()
    model = SoftmaxRegression(epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :5])


def test_eval_set_is_validated():
    X, y = blobs()
    model = SoftmaxRegression(epochs=1)
    with pytest.raises(ValueError, match="not seen"):
        model.fit(X, y, eval_set=(X, y + 7))
    with pytest.raises(ValueError, match="features"):
        model.fit(X, y, eval_set=(X[:, :3], y))
    with pytest.raises(ValueError, match="pair"):
        model.fit(X, y, eval_set=X)
    with pytest.raises(ValueError, match="not seen"):
        model.fit(X, y, eval_set=(X, np.array(["a"] * len(y))))


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"scaling": "robust"}, "scaling"),
        ({"pixel_transform": "log"}, "pixel_transform"),
        ({"power": -1.0}, "power"),
        ({"l2": -1.0}, "l2"),
        ({"momentum": 1.0}, "momentum"),
        ({"patience": 0}, "patience"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"hinges": -1}, "hinges"),
        ({"hinges": 1.5}, "hinges"),
    ],
)
def test_invalid_hyperparameters_are_named(params, name):
    X, y = blobs(20)
    with pytest.raises(ValueError, match=rf"The '{name}' parameter of SoftmaxRegression must be"):
        SoftmaxRegression(**params).fit(X, y)


# ---------------------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    ("params", "with_eval_set"), [({}, True), ({"scaling": "minmax"}, False)]
)
def test_skops_round_trip_without_pickle(tmp_path, params, with_eval_set):
    X, y = fake_images()
    names = np.array(["bag", "boot", "coat", "dress"])[y]
    eval_set = (X[:50], names[:50]) if with_eval_set else None
    model = SoftmaxRegression(**FAST, **params).fit(X, names, eval_set=eval_set)
    path = tmp_path / "model.skops"
    sio.dump(model, path)

    untrusted = sio.get_untrusted_types(file=path)
    assert untrusted == ["pipeline.core.estimator.SoftmaxRegression",
                         "pipeline.core.preprocessing.PixelFeatures"]
    loaded = sio.load(path, trusted=untrusted)

    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    assert loaded.history_ == model.history_
    assert loaded.get_params() == model.get_params()


def test_baseline_pipeline_with_pixel_features_saves_with_skops(tmp_path):
    X, y = fake_images()
    baseline = Pipeline([("features", PixelFeatures()),
                         ("logreg", LogisticRegression(max_iter=200))]).fit(X, y)
    path = tmp_path / "baseline.skops"
    sio.dump(baseline, path)
    untrusted = sio.get_untrusted_types(file=path)
    assert untrusted == ["pipeline.core.preprocessing.PixelFeatures"]
    loaded = sio.load(path, trusted=untrusted)
    np.testing.assert_array_equal(loaded.predict_proba(X), baseline.predict_proba(X))


def test_pixel_features_give_the_estimators_features():
    """The benchmark baseline sees exactly what SoftmaxRegression trains on."""
    X, y = fake_images()
    model = SoftmaxRegression(epochs=1).fit(X, y)
    features = PixelFeatures().fit_transform(X)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, model.features_.transform(X))
    np.testing.assert_array_equal(PixelFeatures().fit(X).transform(X), features)
    logits = features @ model.coef_.T + model.intercept_
    np.testing.assert_allclose(logits, model.decision_function(X), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- scikit-learn API


@parametrize_with_checks(
    # Small batches and few epochs: the check data sets have 20-300 samples. No check is
    # expected to fail, so `expected_failed_checks` stays empty.
    [SoftmaxRegression(epochs=20, batch_size=16, learning_rate=0.02),
     SoftmaxRegression(epochs=20, batch_size=16, learning_rate=0.02, hinges=0),
     PixelFeatures(), PixelFeatures(hinges=0)],
    expected_failed_checks=lambda estimator: {},
)
def test_scikit_learn_compatibility(estimator, check):
    check(estimator)


def test_a_model_file_written_before_features_and_hinges_still_loads_and_predicts() -> None:
    """tests/data/softmax-before-features.skops was saved by the code of commit a4579b9
    (statistics inline, no `hinges`): SoftmaxRegression(epochs=2, random_state=0) fitted on
    default_rng(0).integers(0, 256, (40, 784)) with labels arange(40) % 10; the .npy holds the
    probabilities that code gave for the first four images."""
    from pipeline.support import model_loader

    data = Path(__file__).parent / "data"
    model = model_loader.load(data / "softmax-before-features.skops")
    X = np.random.default_rng(0).integers(0, 256, (40, 784), dtype=np.uint8)[:4]
    assert np.allclose(model.predict_proba(X), np.load(data / "softmax-before-features-proba.npy"),
                       atol=1e-6)
    assert model.get_params()["hinges"] == 0 and "hinges=0" in repr(model)
