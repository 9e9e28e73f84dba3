"""The L-BFGS head: solved to sklearn's optimum, C chosen by validation log loss, written into
``predictions`` for every single-label head, refused with a reason where it does not apply."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from tlkeras.fitting import head_solver
from tlkeras.models.task import infer


def _suffix(features: int, units: int, activation: str | None, hidden: int = 0) -> keras.Model:
    """What ``split_at_block(model, None)`` leaves of a tlkeras head: pooled features in."""
    inputs = keras.Input((features,))
    x = inputs
    if hidden:
        x = keras.layers.Dense(hidden, activation="relu", name="head_dense_1")(x)
    x = keras.layers.Dropout(0.2, name="head_dropout")(x)
    outputs = keras.layers.Dense(units, activation=activation, name="predictions")(x)
    return keras.Model(inputs, outputs)


def _digits(classes: int):
    x, y = load_digits(return_X_y=True)
    keep = y < classes
    x, y = x[keep].astype("float32"), y[keep]
    rng = np.random.RandomState(0)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    cut = int(0.7 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _probabilities(model: keras.Model, x: np.ndarray) -> np.ndarray:
    out = np.asarray(model(x, training=False), dtype=np.float64)
    task, from_logits = infer(model)
    if from_logits:
        out = keras.ops.convert_to_numpy(
            keras.activations.softmax(out) if out.shape[1] > 1 else keras.activations.sigmoid(out)
        )
    return np.column_stack([1 - out[:, 0], out[:, 0]]) if out.shape[1] == 1 else out


@pytest.mark.parametrize(
    "classes, units, activation",
    [
        (2, 1, "sigmoid"),  # binary, one unit
        (2, 1, None),  # binary logit
        (2, 2, "softmax"),  # two-class softmax from one binary score
        (3, 3, "softmax"),
        (4, 4, None),  # multiclass logits
    ],
)
def test_solved_head_predicts_what_sklearn_predicts(classes, units, activation):
    (x, y), (vx, vy) = _digits(classes)
    model = _suffix(x.shape[1], units, activation)
    solution = head_solver.solve(
        model, x, y, groups=np.arange(len(y)), validation=(vx, vy, None), seed=0
    )
    assert solution.C in head_solver.CS and solution.selected_by == "validation"
    assert solution.examples == len(y) and solution.iterations > 0
    # The layer is the fit on x alone at the chosen C: sklearn's own, standardisation folded in.
    mean, scale = x.mean(0), np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    reference = LogisticRegression(C=solution.C, max_iter=head_solver.MAX_ITER, tol=head_solver.TOL)
    reference.fit((x - mean) / scale, y)
    expected = reference.predict_proba((vx - mean) / scale)
    # Both converged to tol 1e-6; weakly regularised optima are flat, so probabilities agree to
    # a few 1e-3 and the decisions exactly.
    np.testing.assert_allclose(_probabilities(model, vx), expected, atol=5e-3)
    assert (_probabilities(model, vx).argmax(1) == expected.argmax(1)).all()
    # C is the grid's best by validation log loss.
    losses = {}
    for c in head_solver.CS:
        candidate = LogisticRegression(C=c, max_iter=head_solver.MAX_ITER, tol=head_solver.TOL)
        candidate.fit((x - mean) / scale, y)
        losses[c] = log_loss(vy, candidate.predict_proba((vx - mean) / scale))
    assert losses[solution.C] == pytest.approx(min(losses.values()), rel=1e-3)


def test_refit_fits_the_union_at_the_chosen_c():
    (x, y), (vx, vy) = _digits(3)
    model = _suffix(x.shape[1], 3, "softmax")
    solution = head_solver.solve(model, x, y, groups=np.arange(len(y)), validation=(vx, vy, None))
    before = model.get_layer("predictions").get_weights()
    rows, labels = np.concatenate([x, vx]), np.concatenate([y, vy])
    head_solver.refit(model, rows, labels, solution.C)
    after = model.get_layer("predictions").get_weights()
    assert not np.allclose(before[0], after[0])
    mean, scale = rows.mean(0), np.where(rows.std(0) > 1e-12, rows.std(0), 1.0)
    reference = LogisticRegression(C=solution.C, max_iter=head_solver.MAX_ITER, tol=head_solver.TOL)
    reference.fit((rows - mean) / scale, labels)
    np.testing.assert_allclose(
        _probabilities(model, vx), reference.predict_proba((vx - mean) / scale), atol=5e-3
    )


def test_without_validation_grouped_cv_chooses_c_and_views_share_a_fold():
    (x, y), _ = _digits(2)
    # Two "views" of every image: rows 0..n-1 and n..2n-1 belong to the same images.
    rows = np.concatenate([x, x + np.random.RandomState(0).normal(0, 0.5, x.shape)])
    labels, groups = np.tile(y, 2), np.tile(np.arange(len(y)), 2)
    model = _suffix(x.shape[1], 1, "sigmoid")
    solution = head_solver.solve(model, rows, labels, groups=groups, seed=0)
    assert solution.selected_by == "5-fold cv"
    assert np.mean((_probabilities(model, x)[:, 1] > 0.5) == y) > 0.95


def test_sample_weights_move_the_solution():
    (x, y), (vx, vy) = _digits(2)
    plain, weighted = _suffix(x.shape[1], 1, "sigmoid"), _suffix(x.shape[1], 1, "sigmoid")
    groups = np.arange(len(y))
    head_solver.solve(plain, x, y, groups=groups, validation=(vx, vy, None))
    weights = np.where(y == 1, 20.0, 1.0)
    head_solver.solve(
        weighted, x, y, groups=groups, sample_weight=weights, validation=(vx, vy, None)
    )
    # Class 1 weighted up: the weighted head scores class 1 higher on average.
    assert _probabilities(weighted, vx)[:, 1].mean() > _probabilities(plain, vx)[:, 1].mean()


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"task": "multilabel"}, "multilabel trains by gradient"),
        ({"label_smoothing": 0.1}, "label_smoothing=0.1"),
        ({"hidden": 8}, "weighted layers ['head_dense_1', 'predictions']"),
        ({"y": np.zeros(10, int)}, "expected all 3 classes in the training data, received 1"),
    ],
)
def test_unsupported_heads_say_why(kwargs, reason):
    model = _suffix(16, 3, "softmax", hidden=kwargs.pop("hidden", 0))
    task = kwargs.pop("task", "multiclass")
    assert reason in head_solver.unsupported(model, task, **kwargs)
    assert (
        head_solver.unsupported(_suffix(16, 3, "softmax"), "multiclass", y=np.arange(9) % 3) is None
    )


def test_class_ids_from_encoded_labels():
    one_hot = keras.utils.to_categorical([2, 0, 1], 3)
    assert head_solver.class_ids(one_hot).tolist() == [2, 0, 1]
    assert head_solver.class_ids(np.array([[1.0], [0.0]])).tolist() == [1, 0]
    assert head_solver.class_ids(np.array([0, 1, 1])).tolist() == [0, 1, 1]


def test_check_solver():
    assert head_solver.check_solver("lbfgs") == "lbfgs"
    with pytest.raises(ValueError, match=r"head_solver: expected one of \('lbfgs', 'gradient'\)"):
        head_solver.check_solver("adam")


def test_the_solver_runs_on_solver_threads(monkeypatch):
    from threadpoolctl import threadpool_info

    seen = []
    fit = LogisticRegression.fit

    def recording_fit(self, *args, **kwargs):
        seen.append({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", recording_fit)
    (x, y), _ = _digits(3)
    model = _suffix(x.shape[1], 3, "softmax")
    head_solver.refit(model, x, y, 1.0)
    assert seen == [{head_solver.SOLVER_THREADS}]
