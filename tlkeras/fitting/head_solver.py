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
from dataclasses import asdict, dataclass, field
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
# With a validation split the strengths are tried weakest-regularised last, each fit warm-started
# from the previous one, and the search stops once this many in a row score worse than the best:
# validation log loss against C is unimodal in practice, and the skipped (largest) Cs are the
# slowest fits. Measured on CIFAR-10 (96 px, 12,000 rows x 256 features, 10 classes): the same
# C (0.01) and validation loss (0.86501 vs 0.86502) as the full grid, 7 of 13 strengths tried, in
# 2.6 s instead of 12.7 s.
PATH_PATIENCE = 2
# The search fits each strength to this tolerance, in float32; the chosen one is then fit to TOL in
# float64 from there. Measured on 50,000 CIFAR-10 files (60,000 rows): the same validation losses to
# 1e-4 and the same C, each fit 2-3x faster; the final fit starts next to its optimum.
SEARCH_TOL = 1e-4
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
        at_grid_edge: the best C is the smallest or largest of the grid.
        strengths_tried: how many of ``CS`` were fit (fewer than all when the validation search
            stopped early, see ``PATH_PATIENCE``).
    """

    C: float
    selected_by: str
    examples: int
    iterations: int
    at_grid_edge: bool
    strengths_tried: int = len(CS)
    # The fit's (coefficients, intercepts) on standardised features: where a refit starts.
    start: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"method": LBFGS, **{k: v for k, v in asdict(self).items() if k != "start"}}


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

    mean, scale = _standardiser(x)
    if validation is not None:
        vx, vy, vw = validation
        # One standardised copy at a time (60,000 rows x 256: 61 MB in float32, 123 in float64).
        with threadpool_limits(SOLVER_THREADS):
            c, found, tried = validation_path(
                standardised(x, mean, scale, np.float32),
                y,
                sample_weight,
                standardised(vx, mean, scale, np.float32),
                vy,
                vw,
            )
            start = (found.coef_, found.intercept_)
            del found
            head = _fit(standardised(x, mean, scale), y, c, sample_weight, start)
        _write(trained, head.coef_, head.intercept_, mean, scale)
        return Solution(
            C=c,
            selected_by="validation",
            examples=int(len(x)),
            iterations=int(np.max(head.n_iter_)),
            at_grid_edge=c in (CS[0], CS[-1]),
            strengths_tried=tried,
            start=(head.coef_, head.intercept_),
        )
    smallest = int(np.min(np.unique(groups_by_class(y, groups), return_counts=True)[1]))
    splitter = StratifiedGroupKFold(
        n_splits=max(2, min(CV_FOLDS, smallest)), shuffle=True, random_state=seed
    )
    search = LogisticRegressionCV(
        Cs=list(CS),
        cv=list(splitter.split(x, y, groups)),
        l1_ratios=(0.0,),
        scoring="neg_log_loss",
        max_iter=MAX_ITER,
        tol=TOL,
        random_state=seed,
    )
    with warnings.catch_warnings(), threadpool_limits(SOLVER_THREADS):
        # sklearn's attribute-layout deprecation; C_ is read in a form both layouts give.
        warnings.simplefilter("ignore", FutureWarning)
        search.fit(standardised(x, mean, scale), y, sample_weight=sample_weight)
    c = float(np.ravel(search.C_)[0])
    _write(trained, search.coef_, search.intercept_, mean, scale)
    return Solution(
        C=c,
        selected_by=f"{splitter.n_splits}-fold cv",
        examples=int(len(x)),
        iterations=int(np.max(search.n_iter_)),
        at_grid_edge=c in (CS[0], CS[-1]),
        start=(search.coef_, search.intercept_),
    )


def validation_path(
    x: np.ndarray,
    y: np.ndarray,
    sample_weight: np.ndarray | None,
    vx: np.ndarray,
    vy: np.ndarray,
    vw: np.ndarray | None,
    cs: tuple[float, ...] = CS,
    tol: float = SEARCH_TOL,
) -> tuple[float, Any, int]:
    """The strength of ``cs`` whose logistic regression on ``x`` has the lowest log loss on the
    validation rows: ``(C, the fitted LogisticRegression, strengths tried)``.

    Strengths in increasing order, each fit (to ``tol``) warm-started from the last; the search
    stops after ``PATH_PATIENCE`` strengths in a row worse than the best.
    """
    import copy

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    model = LogisticRegression(C=cs[0], max_iter=MAX_ITER, tol=tol, warm_start=True)
    best: tuple[float, float, Any] | None = None
    worse = tried = 0
    for c in sorted(cs):
        model.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a lone class in vy: log_loss's note
            model.fit(x, y, sample_weight=sample_weight)
            loss = log_loss(vy, model.predict_proba(vx), sample_weight=vw, labels=model.classes_)
        tried += 1
        # A tie goes to the weaker regularisation: its fit started at the stronger one's optimum
        # and moved less than ``tol`` (separable data, where the loss keeps falling with C).
        if best is None or loss <= best[0]:
            best, worse = (loss, c, copy.deepcopy(model)), 0
        else:
            worse += 1
            if worse >= PATH_PATIENCE:
                break
    assert best is not None
    return best[1], best[2], tried


def refit(
    trained: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    c: float,
    *,
    sample_weight: np.ndarray | None = None,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> int:
    """Fit the head of ``trained`` on ``x`` at the chosen ``c``; returns the L-BFGS iterations.
    ``start``: coefficients to start from (``Solution.start``: the same problem on fewer rows)."""
    mean, scale = _standardiser(x)
    with threadpool_limits(SOLVER_THREADS):
        head = _fit(standardised(x, mean, scale), y, c, sample_weight, start)
    _write(trained, head.coef_, head.intercept_, mean, scale)
    return int(np.max(head.n_iter_))


def _fit(
    x: np.ndarray,
    y: np.ndarray,
    c: float,
    sample_weight: np.ndarray | None,
    start: tuple[np.ndarray, np.ndarray] | None,
) -> Any:
    """A logistic regression fit to ``TOL`` on standardised ``x``, from ``start`` when given."""
    from sklearn.linear_model import LogisticRegression

    head = LogisticRegression(C=c, max_iter=MAX_ITER, tol=TOL, warm_start=start is not None)
    if start is not None:  # sklearn's warm start reads these
        head.coef_ = np.array(start[0], np.float64)
        head.intercept_ = np.array(start[1], np.float64)
    head.fit(x, y, sample_weight=sample_weight)
    return head


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
    """Per-feature mean and scale, in float64 (bfloat16 features from a mixed-precision model
    are not numeric to sklearn; float32 sums lose digits over many rows)."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    mean, scale = x.mean(axis=0, dtype=np.float64), x.std(axis=0, dtype=np.float64)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def standardised(
    x: np.ndarray, mean: np.ndarray, scale: np.ndarray, dtype: Any = np.float64
) -> np.ndarray:
    """``(x - mean) / scale`` as a new ``dtype`` array, computed in place (one copy of ``x``)."""
    out = np.array(x, dtype=dtype)
    out -= mean.astype(dtype)
    out /= scale.astype(dtype)
    return out


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
