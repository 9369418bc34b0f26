"""Multinomial logistic (softmax) regression as a scikit-learn classifier, trained in float32.

The fitted model owns its input preprocessing (a fixed per-pixel transform, then scaling), so raw
uint8 images go straight into `predict`, and it keeps only numpy arrays and plain Python values as
fitted attributes so that `skops.io` can save it without pickle.
"""

from __future__ import annotations

import contextvars
import functools
import math
import numbers
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import ThreadpoolController

from pipeline.core.errors import PipelineError
from pipeline.core.preprocessing import (
    ACCEPTED_DTYPES,
    PIXEL_PARAMETER_CONSTRAINTS,
    PixelFeatures,
    row_chunks,
    spare_core,
    transform_pixels,
)
from pipeline.core.softmax import cross_entropy, log_softmax, softmax

# No wall time here: history_ is saved with the model, and the same fit must give the same file.
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


@functools.cache
def _blas_threads() -> ThreadpoolController:
    """Created once: scanning the loaded libraries costs milliseconds, too much per predict."""
    return ThreadpoolController()


def _one_blas_thread():
    """One BLAS thread: OpenBLAS rounds its one-thread products differently from its threaded
    ones, so the model's bytes would depend on the machine's cores; and its threads busy-wait,
    which makes the fit's skinny products up to 10x slower when the cores are shared (measured
    with other work running). `_BatchGradients` uses two cores its own way instead."""
    return _blas_threads().limit(limits=1, user_api="blas")


class TrainingDivergedError(PipelineError, ValueError):
    """The training loss became NaN or infinite; the message names the hyperparameter to lower."""


# Rows per product inside a batch part. OpenBLAS (0.3.31, SkylakeX) multiplies a 10 x 32 by
# 32 x 2352 block with its small-matrix kernel (m*n*k under 1e6), about twice as fast per row
# as one 256-row product, and each block's rows stay in cache from the forward to the backward
# product (benchmarks/bench_softmax.py, docs/performance.md).
_BLOCK_ROWS = 32
# Blocks whose partial gradients are held at once: 1.5 MB for 2352 features, whatever the batch
# size (a full-batch fit of 60,000 rows would otherwise hold 176 MB of them per part).
_BLOCKS_PER_SUM = 16


def loss_and_gradients(
    coef: np.ndarray, intercept: np.ndarray, X: np.ndarray, labels: np.ndarray, l2: float = 0.0
) -> tuple[float, np.ndarray, np.ndarray]:
    """The training objective (mean cross-entropy + l2/2 * ||coef||^2) and its gradients.

    `coef` is (n_classes, n_features) as in scikit-learn and `labels` are class indices. This is
    an allocating wrapper around the kernel the training loop runs, so a finite difference test
    of it checks the very code that trains the model.
    """
    X = np.asarray(X)
    coef = np.asarray(coef)
    intercept = np.asarray(intercept)
    dtype = np.result_type(X, coef)
    kernel = _BatchGradients(coef.shape[0], coef.shape[1], X.shape[0], dtype)
    grad_coef = np.empty_like(coef)
    grad_intercept = np.empty_like(intercept)
    data_loss, _ = kernel(coef, intercept, X, np.asarray(labels), grad_coef, grad_intercept)
    grad_coef += grad_coef.dtype.type(l2) * coef
    penalty = 0.5 * l2 * float(np.square(coef, dtype=np.float64).sum())
    return data_loss + penalty, grad_coef, grad_intercept


def _part_forward_backward(
    coef: np.ndarray,
    intercept: np.ndarray,
    X: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    logits: np.ndarray,
    partial_grads: np.ndarray,
    grad_coef: np.ndarray,
    grad_intercept: np.ndarray,
) -> tuple[float, int]:
    """One part of a batch: its share of the gradients in place; its summed cross-entropy and
    correct count.

    Logits are kept as (n_classes, n_samples) so the per-sample reductions run across 10
    contiguous rows instead of along 10-element rows, which numpy does several times faster.
    The products run in blocks of `_BLOCK_ROWS` rows as one stacked matmul each way: one call
    (and one release of the GIL) for all the blocks, so the other part's thread is not held up.
    The blocks' gradients are summed in block order, the same bits on any thread.
    """
    n_classes, n_samples = logits.shape
    n_blocks = n_samples // _BLOCK_ROWS
    blocked = n_blocks * _BLOCK_ROWS
    X_blocks = X[:blocked].reshape(n_blocks, _BLOCK_ROWS, X.shape[1])
    # (block, class, row) views of the logits: writing them fills `logits` in place.
    logit_blocks = logits[:, :blocked].reshape(n_classes, n_blocks, _BLOCK_ROWS).transpose(1, 0, 2)
    if n_blocks:
        np.matmul(coef, X_blocks.transpose(0, 2, 1), out=logit_blocks)
    if blocked < n_samples:
        np.matmul(coef, X[blocked:].T, out=logits[:, blocked:])

    columns = np.arange(n_samples)
    logits += intercept[:, None]
    n_correct = int(np.count_nonzero(logits.argmax(axis=0) == labels))
    logits -= logits.max(axis=0)
    true_class_logits = logits[labels, columns]
    np.exp(logits, out=logits)
    normalisers = logits.sum(axis=0)
    loss_sum = float(
        np.sum(np.log(normalisers, dtype=np.float64) - true_class_logits, dtype=np.float64)
    )
    logits /= normalisers  # now probabilities
    logits[labels, columns] -= 1.0  # now n_samples * d(loss)/d(logits)
    logits *= logits.dtype.type(1.0 / batch_size)

    # Groups of blocks, the remainder (fewer rows) last in the last group.
    groups = [(start, min(start + _BLOCKS_PER_SUM, n_blocks))
              for start in range(0, n_blocks, _BLOCKS_PER_SUM)] or [(0, 0)]
    for start, stop in groups:
        if stop > start:
            np.matmul(logit_blocks[start:stop], X_blocks[start:stop],
                      out=partial_grads[: stop - start])
        n_partials = stop - start
        if stop == n_blocks and blocked < n_samples:
            np.matmul(logits[:, blocked:], X[blocked:], out=partial_grads[n_partials])
            n_partials += 1
        if start == 0:
            np.sum(partial_grads[:n_partials], axis=0, out=grad_coef)
        else:
            grad_coef += np.sum(partial_grads[:n_partials], axis=0)
    np.sum(logits, axis=1, out=grad_intercept)
    return loss_sum, n_correct


def _first_part(size: int) -> int:
    """Rows of a batch for the calling thread; the helper takes the rest.

    About 7/16 at a block boundary, not half: the caller also runs the optimizer between
    batches, and the two threads then reach their softmax (many small numpy calls, each taking
    the GIL) at different times. Measured on the default fit: 5 epochs 0.555-0.574 s against
    0.589-0.634 s with 8 blocks each. A fixed function of the size: the bits never depend on
    the threads.
    """
    first = size * 7 // 16 // _BLOCK_ROWS * _BLOCK_ROWS
    return first or (size + 1) // 2


class _BatchGradients:
    """Mean cross-entropy, correct count and data gradients of a mini-batch, in two fixed parts.

    The parts' gradients are added in a fixed order, so the result is the same bits whether
    the second part runs on a helper thread (numpy releases the GIL in the products) or after
    the first. That keeps BLAS at one thread, deterministic, and still uses two cores: each
    part is a one-thread product on its own core, and only one hand-over per batch is needed.
    Without an idle second core (or with `parallel=False`) both parts run in the calling
    thread.
    """

    def __init__(self, n_classes: int, n_features: int, batch_size: int, dtype,
                 parallel: bool = False):
        # Either part of a smaller last batch can be larger than that part of a full one.
        n_partials = min(batch_size // _BLOCK_ROWS, _BLOCKS_PER_SUM) + 1
        self.logits = [np.empty(n_classes * batch_size, dtype=dtype) for _ in range(2)]
        self.partial_grads = [np.empty((n_partials, n_classes, n_features), dtype=dtype)
                              for _ in range(2)]
        self.grad_coefs = [np.empty((n_classes, n_features), dtype=dtype) for _ in range(2)]
        self.grad_intercepts = [np.empty(n_classes, dtype=dtype) for _ in range(2)]
        self.helper = ThreadPoolExecutor(1) if parallel and spare_core() else None

    def close(self) -> None:
        if self.helper is not None:
            self.helper.shutdown()

    def _part(self, which: int, coef, intercept, X, labels, batch_size: int):
        n_classes = coef.shape[0]
        logits = self.logits[which][: n_classes * X.shape[0]].reshape(n_classes, X.shape[0])
        return _part_forward_backward(coef, intercept, X, labels, batch_size, logits,
                                      self.partial_grads[which], self.grad_coefs[which],
                                      self.grad_intercepts[which])

    def __call__(self, coef, intercept, X, labels, grad_coef,
                 grad_intercept) -> tuple[float, int]:
        size = X.shape[0]
        middle = _first_part(size)
        if middle == size:  # one sample: no second part
            loss_sum, n_correct = self._part(0, coef, intercept, X, labels, size)
            grad_coef[...] = self.grad_coefs[0]
            grad_intercept[...] = self.grad_intercepts[0]
        else:
            second = (1, coef, intercept, X[middle:], labels[middle:], size)
            # In a copy of the caller's context: numpy's error state (np.errstate) lives there.
            pending = (self.helper.submit(contextvars.copy_context().run, self._part, *second)
                       if self.helper else None)
            loss_first, correct_first = self._part(0, coef, intercept, X[:middle],
                                                   labels[:middle], size)
            loss_second, correct_second = (pending.result() if pending
                                           else self._part(*second))
            loss_sum, n_correct = loss_first + loss_second, correct_first + correct_second
            np.add(self.grad_coefs[0], self.grad_coefs[1], out=grad_coef)
            np.add(self.grad_intercepts[0], self.grad_intercepts[1], out=grad_intercept)
        return loss_sum / size, n_correct


class _FoldedScaling:
    """Standardisation folded into the weights, so training reads unscaled features.

    With z = (x - mean) / scale, the logits W z + b are (W / scale) x + (b - (W / scale) mean),
    and the gradient on W is (G' x - (G' 1) mean) / scale. A few operations on the 10 x 2352
    weights per batch replace a table of scaled values per pixel when the features are built
    (docs/performance.md). The weights trained and kept are those of the scaled features.
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray, n_classes: int):
        self.mean = mean
        self.inverse_scale = np.float32(1.0) / scale
        self.coef = np.empty((n_classes, mean.shape[0]), dtype=np.float32)
        self.intercept = np.empty(n_classes, dtype=np.float32)
        self.correction = np.empty_like(self.coef)

    def weights(self, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The weights on unscaled features that give the same logits as (coef, intercept)."""
        np.multiply(coef, self.inverse_scale, out=self.coef)
        np.subtract(intercept, self.coef @ self.mean, out=self.intercept)
        return self.coef, self.intercept

    def gradients(self, grad_coef: np.ndarray, grad_intercept: np.ndarray) -> None:
        """In place: gradients on the unscaled weights to those on the scaled ones."""
        np.multiply(grad_intercept[:, None], self.mean, out=self.correction)
        grad_coef -= self.correction
        grad_coef *= self.inverse_scale


class _SGD:
    """Momentum SGD (PyTorch convention: velocity accumulates raw gradients)."""

    def __init__(self, params: list[np.ndarray], momentum: float, nesterov: bool):
        self.momentum = momentum
        self.nesterov = nesterov
        self.velocities = [np.zeros_like(p) for p in params]

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        for param, grad, velocity in zip(params, grads, self.velocities, strict=True):
            if self.momentum:
                velocity *= velocity.dtype.type(self.momentum)
                velocity += grad
                if self.nesterov:
                    grad += velocity.dtype.type(self.momentum) * velocity
                else:
                    grad = velocity
            param -= param.dtype.type(lr) * grad


class _Adam:
    def __init__(self, params: list[np.ndarray]):
        self.first_moments = [np.zeros_like(p) for p in params]
        self.second_moments = [np.zeros_like(p) for p in params]
        self.n_steps = 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        self.n_steps += 1
        t = self.n_steps
        step_size = lr * math.sqrt(1.0 - _ADAM_BETA2**t) / (1.0 - _ADAM_BETA1**t)
        for param, grad, m, v in zip(
            params, grads, self.first_moments, self.second_moments, strict=True
        ):
            dtype = param.dtype.type
            m *= dtype(_ADAM_BETA1)
            m += dtype(1.0 - _ADAM_BETA1) * grad
            v *= dtype(_ADAM_BETA2)
            np.square(grad, out=grad)
            v += dtype(1.0 - _ADAM_BETA2) * grad
            denominator = np.sqrt(v)
            denominator += dtype(_ADAM_EPS)
            param -= dtype(step_size) * m / denominator


class SoftmaxRegression(ClassifierMixin, BaseEstimator):
    """Softmax regression trained by mini-batch Adam or SGD, with its preprocessing built in.

    The model is linear in its features. Features are fixed functions of each input value alone:
    x/255 raised to a power (`pixel_transform`; signed, so negative inputs stay finite) and
    `hinges` hinge functions max(x/255 - k, 0), then, with `scaling="standard"`, standardised
    with per-feature statistics learned in `fit` (std floored at
    `pipeline.core.preprocessing.STD_FLOOR`). The power < 1 spreads out the dark intensities
    where most of the shape and texture information sits; on Fashion-MNIST it lifts test
    accuracy of a linear model from about 0.845 to about 0.857, and the hinges (a learned
    piecewise-linear function of each pixel) to about 0.865.

    The defaults were tuned on a 50k/10k split of the training images: accuracy is flat from 4
    to 8 epochs (Adam, lr 0.01, cosine), so the fewest were kept. `benchmarks/bench_softmax.py`
    checks test accuracy >= 0.8631 and a fit within 2x its floor, the bare matrix products of the
    same epochs (docs/performance.md).

    Mini-batches are drawn once: the rows are shuffled at the start of `fit`, and each epoch
    visits the same contiguous batches in a new random order. That reads the features where they
    lie instead of gathering every batch (which took as long as the products themselves);
    the default model's test accuracy on Fashion-MNIST moved from 0.8655 to 0.8645.

    Parameters
    ----------
    optimizer : {"adam", "sgd"}
    learning_rate : float
        Initial step size; the schedule decays it from here.
    momentum, nesterov : SGD only (ignored by Adam).
    batch_size : int
        Capped at the number of training samples.
    epochs : int
        Number of passes over the data (the most, if early stopping ends training sooner).
    lr_schedule : {"cosine", "constant", "step"}
        "cosine" anneals per mini-batch towards 0 at the end of `epochs`; "step" multiplies the
        rate by 0.1 after 50% and again after 75% of the epochs.
    l2 : float
        Strength of the penalty l2/2 * ||coef||^2 added to the mean cross-entropy (intercept
        unpenalised).
    scaling : {"standard", "minmax"}
        "minmax" divides by 255 only; "standard" also centres and scales each feature.
    pixel_transform : {"power", "sqrt", None}
        Fixed elementwise transform of x/255: sign(x)*|x|**power, sqrt, or none. (Not called
        `transform`: scikit-learn would take an attribute of that name for a transformer.)
    power : float
        Exponent used by `pixel_transform="power"`.
    hinges : int
        Number of hinge features max(x/255 - k, 0) per pixel, at knots evenly spaced in (0, 1)
        (2: k = 1/3, 2/3). With the transformed pixel they make each pixel's contribution a
        learned piecewise function of its intensity; the model stays additive over pixels.
    early_stopping : bool
        Stop when the validation loss has not improved for `patience` epochs, then restore the
        weights of the best epoch. Validation data is `eval_set` if given to `fit`, otherwise a
        random `validation_fraction` of the training data is held out (as MLPClassifier does).
    patience : int
    validation_fraction : float
        Used only for early stopping without an `eval_set`.
    random_state : int, RandomState or None
        Seeds the shuffle, the batch order and the hold-out split. Weights start at zero (the
        loss is convex), so a fixed seed gives bit-identical weights; the default is a fixed
        seed for that reason.

    Attributes
    ----------
    classes_, n_features_in_ : as in scikit-learn.
    coef_ : ndarray (n_classes, n_features), float32
        Weights on the preprocessed (transformed and scaled) features.
    intercept_ : ndarray (n_classes,), float32
    features_ : PixelFeatures
        The fitted preprocessing: the pixel transform and the standardisation statistics of the
        transformed features (`mean_`, `scale_`; None with `scaling="minmax"`).
    history_ : list of dict
        One record per epoch with exactly the keys `HISTORY_KEYS`. `train_loss` and
        `train_accuracy` are running means over the epoch's mini-batches (cross-entropy without
        the penalty); `val_loss`/`val_accuracy` are measured on the validation data after the
        epoch and are None when there is no validation data; `lr` is the rate at the start of
        the epoch. The callback gets each record with one more key, `seconds`, the epoch's
        wall time including validation (kept out of the model, whose file must not depend on
        the clock).
    best_epoch_ : int
        The (1-based) epoch whose weights the model holds: the last one unless early stopping
        restored an earlier one.
    n_iter_ : int
        Number of epochs actually run (scikit-learn's name, as in MLPClassifier).
    """

    _parameter_constraints: dict = {
        "optimizer": [StrOptions({"adam", "sgd"})],
        "learning_rate": [Interval(numbers.Real, 0, math.inf, closed="neither")],
        "momentum": [Interval(numbers.Real, 0, 1, closed="left")],
        "nesterov": ["boolean"],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "lr_schedule": [StrOptions({"constant", "cosine", "step"})],
        "l2": [Interval(numbers.Real, 0, math.inf, closed="left")],
        **PIXEL_PARAMETER_CONSTRAINTS,
        "early_stopping": ["boolean"],
        "patience": [Interval(numbers.Integral, 1, None, closed="left")],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        optimizer: str = "adam",
        learning_rate: float = 0.005,
        momentum: float = 0.9,
        nesterov: bool = True,
        batch_size: int = 512,
        epochs: int = 5,
        lr_schedule: str = "cosine",
        l2: float = 1e-3,
        scaling: str = "standard",
        pixel_transform: str | None = "power",
        power: float = 0.25,
        hinges: int = 2,
        early_stopping: bool = False,
        patience: int = 3,
        validation_fraction: float = 0.1,
        random_state: int | np.random.RandomState | None = 0,
    ):
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov
        self.batch_size = batch_size
        self.epochs = epochs
        self.lr_schedule = lr_schedule
        self.l2 = l2
        self.scaling = scaling
        self.pixel_transform = pixel_transform
        self.power = power
        self.hinges = hinges
        self.early_stopping = early_stopping
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    # ------------------------------------------------------------------ preprocessing

    def _pixel_features(self) -> PixelFeatures:
        return PixelFeatures(pixel_transform=self.pixel_transform, power=self.power,
                             scaling=self.scaling, hinges=self.hinges)

    def __setstate__(self, state: dict) -> None:
        """Model files written before `hinges` had none; before `features_`, they kept the
        statistics inline."""
        state.setdefault("hinges", 0)
        if "coef_" in state and "features_" not in state and "feature_mean_" in state:
            features = PixelFeatures(pixel_transform=state.get("pixel_transform", "power"),
                                     power=state.get("power", 0.3),
                                     scaling=state.get("scaling", "standard"), hinges=0)
            features.mean_, features.scale_ = state.pop("feature_mean_"), state.pop(
                "feature_scale_")
            features.n_features_in_ = state.get("n_features_in_")
            state["features_"] = features
        super().__setstate__(state)

    # ------------------------------------------------------------------ validation of data

    def _validate_X(self, X, *, reset: bool) -> np.ndarray:
        return validate_data(self, X, reset=reset, dtype=ACCEPTED_DTYPES, order="C")

    def _encode_labels(self, y: np.ndarray, what: str) -> np.ndarray:
        try:
            positions = np.searchsorted(self.classes_, y)
            positions = np.minimum(positions, len(self.classes_) - 1)
            unknown = self.classes_[positions] != y
        except TypeError:  # e.g. string labels where the training labels were numbers
            raise ValueError(
                f"{what} labels of dtype {y.dtype} cannot be compared with the training labels "
                f"(dtype {self.classes_.dtype})"
            ) from None
        if np.any(unknown):
            raise ValueError(
                f"{what} contains labels not seen in the training labels: "
                f"{np.unique(y[unknown])[:10].tolist()}"
            )
        return positions

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        X,
        y,
        *,
        eval_set: tuple | None = None,
        callback: Callable[[dict], object] | None = None,
    ) -> SoftmaxRegression:
        """Train from zero weights; `eval_set=(X_val, y_val)` feeds val metrics/early stopping.

        `callback(epoch_record)` is called after every epoch with a copy of the history record
        and the epoch's wall time, `seconds`.
        Raises TrainingDivergedError if the loss stops being finite. A fit that raises leaves
        no fitted attributes behind (not even those of an earlier successful fit), so a failed
        model can never be used by mistake.
        """
        self._forget_fit()
        try:
            return self._fit(X, y, eval_set, callback)
        except Exception:
            self._forget_fit()
            raise

    def _forget_fit(self) -> None:
        for name in [name for name in vars(self) if name.endswith("_") and name[0] != "_"]:
            delattr(self, name)

    def _fit(self, X, y, eval_set, callback) -> SoftmaxRegression:
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=ACCEPTED_DTYPES, order="C")
        check_classification_targets(y)
        classes, y_encoded = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes to train, but y contains only "
                f"one class: {classes.tolist()}"
            )
        self.classes_ = classes
        rng = check_random_state(self.random_state)

        X_val = y_val_encoded = None
        if eval_set is not None:
            if not (isinstance(eval_set, tuple | list) and len(eval_set) == 2):
                raise ValueError("eval_set must be a pair (X_val, y_val)")
            X_val = self._validate_X(eval_set[0], reset=False)
            y_val = np.asarray(eval_set[1])
            if y_val.ndim != 1 or y_val.shape[0] != X_val.shape[0]:
                raise ValueError(
                    f"eval_set labels must have shape ({X_val.shape[0]},), got {y_val.shape}"
                )
            y_val_encoded = self._encode_labels(y_val, "eval_set")
        elif self.early_stopping:
            n_val = int(math.ceil(self.validation_fraction * X.shape[0]))
            if n_val >= X.shape[0]:
                raise ValueError(
                    f"early_stopping holds out validation_fraction={self.validation_fraction} "
                    f"of {X.shape[0]} samples, leaving none to train on; pass eval_set instead"
                )
            order = rng.permutation(X.shape[0])
            X_val, y_val_encoded = X[order[:n_val]], y_encoded[order[:n_val]]
            X, y_encoded = X[order[n_val:]], y_encoded[order[n_val:]]

        # Shuffled once, as the features are built: each epoch then visits contiguous batches
        # of these rows in a new order, and the products read the features where they lie
        # instead of gathering 4.8 MB for every batch. The features stay unscaled: training
        # folds the scaling into the weights (`_FoldedScaling`).
        order = rng.permutation(X.shape[0])
        self.features_ = self._pixel_features()
        X_train = self.features_.fit_transform_unscaled(X, order)
        y_encoded = y_encoded[order]
        if X_val is not None:
            X_val = transform_pixels(X_val, self.pixel_transform, self.power, self.hinges)

        # Overflow warnings are silenced: a non-finite loss is detected and reported as
        # TrainingDivergedError instead.
        with (
            _one_blas_thread(),
            np.errstate(over="ignore", invalid="ignore"),
        ):
            coef, intercept = self._train(X_train, y_encoded, X_val, y_val_encoded, rng, callback)
        self.coef_, self.intercept_ = coef, intercept
        return self

    def _learning_rates(self, n_steps_per_epoch: int) -> Callable[[int, int], float]:
        base = float(self.learning_rate)
        total_steps = self.epochs * n_steps_per_epoch
        if self.lr_schedule == "constant":
            return lambda epoch, step: base
        if self.lr_schedule == "cosine":
            return lambda epoch, step: base * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
        milestones = (self.epochs * 0.5, self.epochs * 0.75)
        return lambda epoch, step: base * 0.1 ** sum(epoch >= m for m in milestones)

    def _train(self, X, y, X_val, y_val, rng, callback):
        n_samples, n_features = X.shape
        n_classes = len(self.classes_)
        batch_size = min(self.batch_size, n_samples)
        n_steps_per_epoch = math.ceil(n_samples / batch_size)
        learning_rate_at = self._learning_rates(n_steps_per_epoch)

        coef = np.zeros((n_classes, n_features), dtype=np.float32)
        intercept = np.zeros(n_classes, dtype=np.float32)
        grad_coef, grad_intercept = np.empty_like(coef), np.empty_like(intercept)
        params, grads = [coef, intercept], [grad_coef, grad_intercept]
        if self.optimizer == "adam":
            optimizer = _Adam(params)
        else:
            optimizer = _SGD(params, self.momentum, self.nesterov)
        kernel = _BatchGradients(n_classes, n_features, batch_size, np.float32, parallel=True)
        fold = (None if self.features_.mean_ is None
                else _FoldedScaling(self.features_.mean_, self.features_.scale_, n_classes))
        try:
            return self._epochs(X, y, X_val, y_val, rng, callback, kernel, fold, params, grads,
                                optimizer, learning_rate_at)
        finally:
            kernel.close()

    def _epochs(self, X, y, X_val, y_val, rng, callback, kernel, fold, params, grads,
                optimizer, learning_rate_at):
        n_samples = X.shape[0]
        batch_size = min(self.batch_size, n_samples)
        n_steps_per_epoch = math.ceil(n_samples / batch_size)
        coef, intercept = params
        grad_coef, grad_intercept = grads
        l2 = grad_coef.dtype.type(self.l2)

        def unscaled_weights():
            return (coef, intercept) if fold is None else fold.weights(coef, intercept)

        history = []
        best_val_loss, best_epoch, best_params = math.inf, 0, None
        step = 0
        for epoch in range(1, self.epochs + 1):
            started = time.perf_counter()
            epoch_lr = learning_rate_at(epoch - 1, step)
            loss_sum, n_correct = 0.0, 0
            # X is in a random order already (see `_fit`); the batches come in a new one.
            for batch in rng.permutation(n_steps_per_epoch):
                start = batch * batch_size
                stop = min(start + batch_size, n_samples)
                size = stop - start
                batch_loss, batch_correct = kernel(*unscaled_weights(), X[start:stop],
                                                   y[start:stop], grad_coef, grad_intercept)
                if fold is not None:
                    fold.gradients(grad_coef, grad_intercept)
                if l2:
                    grad_coef += l2 * coef
                if not math.isfinite(batch_loss):
                    self._raise_diverged(epoch, batch_loss)
                loss_sum += batch_loss * size
                n_correct += batch_correct
                optimizer.step(params, grads, learning_rate_at(epoch - 1, step))
                step += 1
            if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
                self._raise_diverged(epoch, math.nan)

            val_loss = val_accuracy = None
            if X_val is not None:
                val_loss, val_accuracy = _evaluate(*unscaled_weights(), X_val, y_val)
                if not math.isfinite(val_loss):
                    self._raise_diverged(epoch, val_loss)
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / n_samples,
                "train_accuracy": n_correct / n_samples,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": epoch_lr,
            }
            history.append(record)
            if callback is not None:
                callback({**record, "seconds": time.perf_counter() - started})

            if self.early_stopping:
                if val_loss < best_val_loss:
                    best_val_loss, best_epoch = val_loss, epoch
                    best_params = (coef.copy(), intercept.copy())
                elif epoch - best_epoch >= self.patience:
                    break
        self.history_ = history
        self.n_iter_ = len(history)
        if self.early_stopping:
            self.best_epoch_ = best_epoch
            return best_params
        self.best_epoch_ = self.n_iter_
        return coef, intercept

    def _raise_diverged(self, epoch: int, loss: float) -> None:
        hint = "learning_rate" + (" (or momentum)" if self.optimizer == "sgd" else "")
        raise TrainingDivergedError(
            f"training diverged in epoch {epoch}: the loss became {loss} with "
            f"learning_rate={self.learning_rate}, optimizer={self.optimizer!r}; lower {hint}"
        )

    # ------------------------------------------------------------------ predict

    def _logits(self, X) -> np.ndarray:
        """float64 logits: float32 products would differ in the last bits with the batch size
        (BLAS picks different kernels), so a sample's scores would depend on its neighbours."""
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        # Fold the standardisation into the weights: one small product instead of a pass over X.
        coef = self.coef_.astype(np.float64)
        intercept = self.intercept_.astype(np.float64)
        features = self.features_
        if features.mean_ is not None:
            coef /= features.scale_
            intercept -= coef @ features.mean_
        transformed = transform_pixels(X, features.pixel_transform, features.power,
                                       features.hinges)
        logits = np.empty((X.shape[0], coef.shape[0]), dtype=np.float64)
        with _one_blas_thread():
            for start, stop in row_chunks(X.shape[0]):
                block = transformed[start:stop].astype(np.float64)
                np.matmul(block, coef.T, out=logits[start:stop])
        logits += intercept
        return logits

    def decision_function(self, X) -> np.ndarray:
        """Class scores (logits); for two classes the score of classes_[1], as scikit-learn."""
        logits = self._logits(X)
        if len(self.classes_) == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict(self, X) -> np.ndarray:
        logits = self._logits(X)
        return self.classes_[logits.argmax(axis=1)]

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self._logits(X))

    def predict_log_proba(self, X) -> np.ndarray:
        return log_softmax(self._logits(X))


def _evaluate(coef, intercept, X, labels) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on preprocessed features, in blocks to bound memory."""
    loss_sum, n_correct = 0.0, 0
    for start, stop in row_chunks(X.shape[0], 8192):
        block_labels = labels[start:stop]
        logits = X[start:stop] @ coef.T
        logits += intercept
        n_correct += int(np.count_nonzero(logits.argmax(axis=1) == block_labels))
        loss_sum += cross_entropy(logits, block_labels) * (stop - start)
    return loss_sum / X.shape[0], n_correct / X.shape[0]
