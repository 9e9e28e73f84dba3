"""The head, solved: a linear head on cached features fit to convergence by L-BFGS.

With the whole backbone frozen and a linear head (``pool`` → dropout → ``predictions``), training
the head is a convex problem: L2-regularised logistic regression on the pooled features. Gradient
epochs approach its optimum slowly (hundreds of Keras epochs, each with its callbacks); scikit-learn's
``LogisticRegressionCV`` solves it to convergence for a grid of regularisation strengths in well
under a second. The strength is chosen by validation log loss (the split the caller gives, or
5-fold cross-validation grouped by image when there is none), and the solution is written into the
``predictions`` Dense layer with the feature standardisation folded into its kernel and bias, so the
model, its export and everything downstream are unchanged.

:func:`unsupported` says why a model's head cannot be solved this way (hidden head layers, a
multi-label head, label smoothing); the caller then trains it with gradient epochs.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np
from threadpoolctl import threadpool_limits

from tlkeras import checks
from tlkeras.models.task import PREDICTIONS_LAYER

LBFGS, GRADIENT = "lbfgs", "gradient"
SOLVERS = (LBFGS, GRADIENT)
# Inverse L2 strengths tried (on standardised features); the grid's ends are reported when chosen.
CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
MAX_ITER = 2000
# Tighter than sklearn's 1e-4: a converged head, the same whichever path reached it.
TOL = 1e-6
CV_FOLDS = 5
# BLAS threads for the solver. Its matrices are small (hundreds of rows, a few hundred features): on
# 2 cores, OpenBLAS's threads cost far more than they give (measured, digits 5-9 features 537 x 256,
# 5 classes: one L-BFGS fit 10.1 s with 2 threads, 0.41 s with 1; the 13-C search 56 s vs 1.8 s).
SOLVER_THREADS = 1


def check_solver(solver: Any, name: str = "head_solver") -> str:
    """``solver`` if it is one of ``SOLVERS``, else a ``ValueError`` naming ``name``."""
    return checks.choice(name, solver, SOLVERS, as_repr=True)


@dataclass(frozen=True)
class Solution:
    """What :func:`solve` chose and fit.

    Attributes:
        C: the chosen inverse L2 strength (on standardised features).
        selected_by: ``"validation"`` (the caller's split) or ``"5-fold cv"`` (grouped by image).
        examples: rows the chosen head was fit on (cached views count once each).
        iterations: L-BFGS iterations of that fit.
        at_grid_edge: the best C is the smallest or largest tried.
    """

    C: float
    selected_by: str
    examples: int
    iterations: int
    at_grid_edge: bool

    def to_dict(self) -> dict[str, Any]:
        return {"method": LBFGS, **asdict(self)}


def unsupported(
    trained: keras.Model, task: str, label_smoothing: float = 0.0, y: np.ndarray | None = None
) -> str | None:
    """Why the head of ``trained`` (the suffix on pooled features) cannot be solved, or ``None``.

    ``task``: the full model's (``tlkeras.models.task.infer``); ``y``: the training class ids, when known
    (every class must occur for the solver).
    """
    if task == "multilabel":
        return "the L-BFGS head solves single-label heads; multilabel trains by gradient"
    if label_smoothing:
        return f"label_smoothing={label_smoothing:g} has no closed-form counterpart"
    layers = [layer for layer in trained.layers if not isinstance(layer, keras.layers.InputLayer)]
    with_weights = [layer.name for layer in layers if layer.weights]
    if with_weights != [PREDICTIONS_LAYER]:
        return f"the head has weighted layers {with_weights}; expected only {PREDICTIONS_LAYER!r}"
    others = [
        layer.name
        for layer in layers
        if layer.name != PREDICTIONS_LAYER and not isinstance(layer, keras.layers.Dropout)
    ]
    if others:
        return f"the head has non-linear layers {others}; expected dropout only"
    dense = trained.get_layer(PREDICTIONS_LAYER)
    if not isinstance(dense, keras.layers.Dense) or not dense.use_bias:
        return f"{PREDICTIONS_LAYER!r} is not a Dense layer with a bias"
    if len(trained.inputs) != 1 or len(trained.inputs[0].shape) != 2:
        return "the head's input is not a pooled feature vector"
    expected = 2 if int(dense.units) == 1 else int(dense.units)
    if y is not None and len(np.unique(y)) != expected:
        return f"expected all {expected} classes in the training data, received {len(np.unique(y))}"
    return None


def class_ids(labels: np.ndarray) -> np.ndarray:
    """Integer class ids from encoded labels: one-hot ``[n, C]`` or binary ``[n, 1]``/``[n]``."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return np.argmax(labels, axis=1)
    return np.rint(labels.reshape(-1)).astype(int)


def solve(
    trained: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    groups: np.ndarray,
    sample_weight: np.ndarray | None = None,
    validation: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    seed: int = 0,
) -> Solution:
    """Fit the ``predictions`` layer of ``trained`` to convergence on pooled features ``x``.

    Args:
        trained: the suffix model (pooled features → predictions); :func:`unsupported` is ``None``.
        x, y: feature rows and integer class ids (several cached views of an image are rows).
        groups: the image each row comes from (views of one image never straddle a CV fold).
        sample_weight: per-row weights (class weights folded in), or ``None``.
        validation: ``(x, y, sample_weight)`` that chooses C; without it, grouped 5-fold CV on
            ``x`` chooses it and the head is then fit on all of ``x``.
        seed: seeds the CV fold assignment.

    Returns:
        The :class:`Solution`; the layer holds the head fit on ``x`` alone when ``validation`` was
        given (call :func:`refit` to add the validation rows).
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedGroupKFold

    if validation is not None:
        vx, vy, vw = validation
        rows = np.concatenate([x, vx])
        labels = np.concatenate([y, vy])
        weights = join_weights(sample_weight, len(x), vw, len(vx))
        folds = [(np.arange(len(x)), np.arange(len(x), len(rows)))]
        selected_by = "validation"
    else:
        rows, labels, weights = x, y, sample_weight
        smallest = int(np.min(np.unique(groups_by_class(y, groups), return_counts=True)[1]))
        splitter = StratifiedGroupKFold(
            n_splits=max(2, min(CV_FOLDS, smallest)), shuffle=True, random_state=seed
        )
        folds = list(splitter.split(rows, labels, groups))
        selected_by = f"{splitter.n_splits}-fold cv"
    mean, scale = _standardiser(x)
    search = LogisticRegressionCV(
        Cs=list(CS),
        cv=folds,
        l1_ratios=(0.0,),
        scoring="neg_log_loss",
        max_iter=MAX_ITER,
        tol=TOL,
        refit=validation is None,
        random_state=seed,
    )
    with warnings.catch_warnings(), threadpool_limits(SOLVER_THREADS):
        # sklearn's attribute-layout deprecation; C_ is read in a form both layouts give.
        warnings.simplefilter("ignore", FutureWarning)
        search.fit((rows - mean) / scale, labels, sample_weight=weights)
    c = float(np.ravel(search.C_)[0])
    # With a validation split, refit=False leaves the one fold's coefficients: the fit on x alone.
    _write(trained, search.coef_, search.intercept_, mean, scale)
    return Solution(
        C=c,
        selected_by=selected_by,
        examples=int(len(x)),
        iterations=int(np.max(search.n_iter_)),
        at_grid_edge=c in (CS[0], CS[-1]),
    )


def refit(
    trained: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    c: float,
    *,
    sample_weight: np.ndarray | None = None,
) -> int:
    """Fit the head of ``trained`` on ``x`` at the chosen ``c``; returns the L-BFGS iterations."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = _standardiser(x)
    head = LogisticRegression(C=c, max_iter=MAX_ITER, tol=TOL)
    with threadpool_limits(SOLVER_THREADS):
        head.fit((x - mean) / scale, y, sample_weight=sample_weight)
    _write(trained, head.coef_, head.intercept_, mean, scale)
    return int(np.max(head.n_iter_))


def groups_by_class(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The class of each distinct group (image), to count images per class."""
    _, first = np.unique(groups, return_index=True)
    return y[first]


def join_weights(
    a: np.ndarray | None, n_a: int, b: np.ndarray | None, n_b: int
) -> np.ndarray | None:
    """Weights of rows ``a`` then ``b`` (``None`` means all ones), or ``None`` if both are."""
    if a is None and b is None:
        return None
    return np.concatenate(
        [np.ones(n_a) if a is None else np.asarray(a), np.ones(n_b) if b is None else np.asarray(b)]
    )


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def _write(
    trained: keras.Model,
    coef: np.ndarray,
    intercept: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
) -> None:
    """Fold the standardisation into ``predictions``: ``w·(x-μ)/σ + b = (w/σ)·x + (b - (w/σ)·μ)``."""
    dense = trained.get_layer(PREDICTIONS_LAYER)
    w = np.asarray(coef, dtype=np.float64) / scale  # [classes or 1, features]
    b = np.asarray(intercept, dtype=np.float64) - w @ mean
    units = int(dense.units)
    if w.shape[0] == 1 and units == 2:
        # A two-unit softmax from one binary score: the logit difference is the score.
        w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    if w.shape[0] != units:
        raise ValueError(
            f"expected the solved head to have {units} outputs (one per class seen in training), "
            f"received {w.shape[0]}"
        )
    kernel, bias = dense.get_weights()
    dense.set_weights([w.T.astype(kernel.dtype), b.astype(bias.dtype)])
