"""Can its scores be trusted? Calibration error, temperature scaling, and withholding low scores.

- ``expected_calibration_error`` / ``reliability_curve`` / ``plot_reliability``: top-label
  confidence (the top probability of a row) against accuracy, in ``n_bins`` equal-width bins of
  ``(0, 1]`` (Guo et al. 2017, "On Calibration of Modern Neural Networks"). ECE is the bins'
  count-weighted mean ``|accuracy - confidence|``; 0 for a perfectly calibrated model. With
  ``task="multilabel"`` every (image, label) pair is one binary prediction.
- ``fit_temperature`` / ``apply_temperature``: temperature scaling. One scalar ``T > 0`` divides the
  logits; ``T > 1`` softens over-confident probabilities, ``T < 1`` sharpens. It is fit on the
  **validation** split (never the test split) by minimising the negative log-likelihood over
  ``log T`` with ``scipy.optimize.minimize_scalar`` (bounded to ``[MIN_TEMPERATURE,
  MAX_TEMPERATURE]``). tlkeras heads output probabilities, so logits are recovered from them:
  ``log p`` for a softmax (and for a binary head given as two columns ``[1 - p, p]``, which is the
  same thing as ``logit(p)``), ``logit(p)`` for each sigmoid of a multi-label head. Dividing the logits
  by ``T > 0`` keeps their order, so predictions (argmax, top-k) never change. The served graph
  applies the same formula (``tlkeras.exports.signatures``; ``tlkeras.export(..., temperature=T)``).
- ``calibrate`` / ``evaluate_temperature``: a ``Calibration`` record (temperature, ECE and NLL
  before/after on the split they were measured on), for ``metrics.json`` and the export's
  ``metadata.json``::

      cal = calibrate(y_val, p_val, task)                      # fit on validation
      test = evaluate_temperature(y_test, p_test, cal.temperature, task, split="test")
      tlkeras.export(model, name, class_names=names, temperature=cal.temperature,
                     metadata={"calibration": {"validation": cal.to_dict(), "test": test.to_dict()}})

- ``withhold_low_scores``: ``"unknown"`` instead of a class when the top score is below a
  ``min_score`` (``tlkeras.serving.app``'s ``min_score``, ``scripts/predict.py --min_score``).

NumPy only at import (scipy and matplotlib are imported by the functions that use them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import checks

DEFAULT_BINS = 15
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
TASKS = ("multiclass", "binary", "multilabel")
# Probabilities are clipped to [TINY, 1 - EPSILON] before taking logs: the smallest normal float32
# and float32's spacing just below 1 (the graph computes in float32; so does this, to agree with it).
TINY = float(np.finfo(np.float32).tiny)
EPSILON = float(2.0**-24)
UNKNOWN = "unknown"


# --------------------------------------------------------------------------------------------------
# Argument checks: "expected … received …".


def check_temperature(temperature: Any, name: str = "temperature") -> float:
    """``temperature`` as a float, or a ``ValueError``: a number in the fitting bounds."""
    note = " (1 = unchanged)"
    return float(checks.interval(name, temperature, MIN_TEMPERATURE, MAX_TEMPERATURE, note=note))


def _probabilities(y_prob: Any, task: str, *, sums: bool = True) -> np.ndarray:
    """``y_prob`` as float64 ``[N, C]`` (a binary ``[N]``/``[N, 1]`` P(class 1) becomes
    ``[1 - p, p]``), checked: finite, in [0, 1], and (``sums``) rows summing to 1 for a softmax:
    temperature scaling reads them as a softmax; calibration error needs only the top one (an int8
    edge model's dequantized rows are a little off)."""
    p = np.asarray(y_prob, dtype=np.float64)
    if task == "binary" and (p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1)):
        p = p.reshape(-1, 1)
        p = np.concatenate([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < (1 if task == "multilabel" else 2):
        raise ValueError(
            f"y_prob: expected probabilities of shape [N, C] with N ≥ 1 (binary: [N], [N, 1] or "
            f"[N, 2]), received shape {list(p.shape)}"
        )
    if task == "binary" and p.shape[1] != 2:
        raise ValueError(
            f"y_prob: task 'binary' expected [N, 2] (or [N]/[N, 1] for P(class 1)), received "
            f"shape {list(p.shape)}"
        )
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"y_prob: expected finite probabilities in [0, 1], received values from {np.nanmin(p)} "
            f"to {np.nanmax(p)}{' and NaN/Inf' if not np.isfinite(p).all() else ''}"
        )
    if sums and task != "multilabel":
        totals = p.sum(axis=1)
        worst = int(np.argmax(np.abs(totals - 1.0)))
        if abs(totals[worst] - 1.0) > 1e-3:
            raise ValueError(
                f"y_prob: task {task!r} expected rows summing to 1 (softmax probabilities), "
                f"received row {worst} summing to {totals[worst]:.4g}"
            )
    return p


def _labels(y_true: Any, n: int, num_classes: int, task: str) -> np.ndarray:
    """Int labels ``[N]`` (one-hot rows accepted), or multi-hot ``[N, C]`` for a multi-label task."""
    y = np.asarray(y_true)
    if task == "multilabel":
        if y.shape != (n, num_classes) or not np.isin(y, (0, 1)).all():
            raise ValueError(
                f"y_true: task 'multilabel' expected multi-hot 0/1 labels of shape "
                f"[{n}, {num_classes}], received shape {list(y.shape)}"
            )
        return y.astype(np.float64)
    if y.ndim == 2 and y.shape == (n, num_classes) and np.isin(y, (0, 1)).all():
        y = np.argmax(y, axis=1)  # one-hot rows
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(
            f"y_true: expected {n} int labels (one per row of y_prob), received shape "
            f"{list(y.shape)}"
        )
    if y.size and (not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"y_true: expected int labels in [0, {num_classes - 1}], received values from "
            f"{y.min()} to {y.max()}"
        )
    return y.astype(np.int64)


def _inputs(
    y_true: Any, y_prob: Any, task: str, *, sums: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    p = _probabilities(y_prob, checks.choice("task", task, TASKS, as_repr=True), sums=sums)
    return _labels(y_true, p.shape[0], p.shape[1], task), p


# --------------------------------------------------------------------------------------------------
# Calibration error and the reliability diagram.


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per bin of ``(edges[i], edges[i + 1]]``: mean top-label confidence, accuracy and count (an
    empty bin has NaN confidence and accuracy)."""

    edges: tuple[float, ...]
    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]
    count: tuple[int, ...]

    @property
    def num_examples(self) -> int:
        return int(sum(self.count))

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean ``|accuracy - confidence|``."""
        n = self.num_examples
        return float(
            sum(
                c / n * abs(a - f)
                for c, a, f in zip(self.count, self.accuracy, self.confidence, strict=True)
                if c
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": list(self.edges),
            "confidence": [None if math.isnan(v) else v for v in self.confidence],
            "accuracy": [None if math.isnan(v) else v for v in self.accuracy],
            "count": list(self.count),
            "ece": self.ece,
        }


def _confidence_and_correct(y: np.ndarray, p: np.ndarray, task: str) -> tuple[np.ndarray, ...]:
    if task == "multilabel":  # every (image, label) pair: a binary prediction at 0.5
        flat_p, flat_y = p.ravel(), y.ravel()
        return np.maximum(flat_p, 1.0 - flat_p), ((flat_p >= 0.5) == (flat_y == 1))
    return p.max(axis=1), np.argmax(p, axis=1) == y


def reliability_curve(
    y_true: Any, y_prob: Any, n_bins: int = DEFAULT_BINS, *, task: str = "multiclass"
) -> ReliabilityCurve:
    """Top-label confidence against accuracy in ``n_bins`` equal-width bins (a reliability diagram).

    ``y_true``: int labels ``[N]`` (or one-hot); multi-hot ``[N, C]`` for ``task="multilabel"``.
    ``y_prob``: probabilities ``[N, C]``; a binary model's two columns ``[1 - p, p]`` (or ``[N]``/
    ``[N, 1]`` P(class 1) with ``task="binary"``).
    """
    n_bins = int(checks.positive_int("n_bins", n_bins))
    y, p = _inputs(y_true, y_prob, task, sums=False)
    confidence, correct = _confidence_and_correct(y, p, task)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lo, hi]: a confidence of exactly 1 is in the last bin, 0 in the first.
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins) / count
    return ReliabilityCurve(
        edges=tuple(float(e) for e in edges),
        confidence=tuple(float(v) for v in mean_conf),
        accuracy=tuple(float(v) for v in accuracy),
        count=tuple(int(c) for c in count),
    )


def expected_calibration_error(
    y_true: Any, y_prob: Any, n_bins: int = DEFAULT_BINS, *, task: str = "multiclass"
) -> float:
    """Expected calibration error (top-label, equal-width bins; see ``reliability_curve``)."""
    return reliability_curve(y_true, y_prob, n_bins, task=task).ece


def plot_reliability(
    curve_before: ReliabilityCurve,
    curve_after: ReliabilityCurve | None,
    path: str | Path,
    *,
    labels: tuple[str, str] = ("before temperature scaling", "after"),
) -> Path:
    """A reliability diagram: accuracy per confidence bin (bars) against the diagonal, one panel per
    curve, its ECE in the title. Written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    curves = [c for c in (curve_before, curve_after) if c is not None]
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 4.5), squeeze=False)
    for ax, curve, label in zip(axes[0], curves, labels, strict=False):
        edges = np.asarray(curve.edges)
        width = np.diff(edges)
        acc = np.nan_to_num(np.asarray(curve.accuracy))
        conf = np.asarray(curve.confidence)
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", label="accuracy")
        filled = ~np.isnan(conf)
        ax.bar(
            edges[:-1][filled],
            (conf - acc)[filled],
            bottom=acc[filled],
            width=width[filled],
            align="edge",
            color="tab:red",
            alpha=0.3,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy")
        ax.set_title(f"{label}: ECE {curve.ece:.3f} (n={curve.num_examples})")
        ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Temperature scaling.


def _logits(p: np.ndarray, task: str) -> np.ndarray:
    """Logits whose activation gives ``p``: ``log p`` (softmax), ``logit(p)`` (each sigmoid)."""
    if task == "multilabel":
        q = np.clip(p, TINY, 1.0 - EPSILON)
        return np.log(q) - np.log1p(-q)
    return np.log(np.clip(p, TINY, None))


def _scaled(z: np.ndarray, temperature: float, task: str) -> np.ndarray:
    z = z / temperature
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float, task: str) -> float:
    """Mean negative log-likelihood of the labels under the logits ``z / temperature``."""
    z = z / temperature
    if task == "multilabel":  # binary cross-entropy, each label, stable
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_softmax[np.arange(len(y)), y]))


def apply_temperature(y_prob: Any, temperature: float, task: str) -> np.ndarray:
    """``y_prob`` with its logits divided by ``temperature``; same shape and dtype (float32 kept).

    Multiclass and binary ``[N, 2]``: ``softmax(log p / T)``; binary ``[N]``/``[N, 1]`` P(class 1):
    ``sigmoid(logit(p) / T)`` (the same thing); multilabel: ``sigmoid(logit(p) / T)`` per label.
    Argmax and top-k are unchanged.
    """
    temperature = check_temperature(temperature)
    raw = np.asarray(y_prob)
    p = _probabilities(raw, checks.choice("task", task, TASKS, as_repr=True))
    out = _scaled(_logits(p, task), temperature, task)
    if task == "binary" and (raw.ndim == 1 or raw.shape[1] == 1):
        out = out[:, 1].reshape(raw.shape)
    return out.astype(raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float64)


def fit_temperature(y_true: Any, y_prob: Any, task: str) -> float:
    """The temperature minimising the negative log-likelihood of ``y_true`` (Guo et al. 2017).

    Fit it on the validation split, never on the split you report. ``y_true``: int labels ``[N]``
    (multi-hot ``[N, C]`` for ``multilabel``); ``y_prob``: the model's probabilities ``[N, C]``
    (binary: ``[N]``, ``[N, 1]`` or ``[N, 2]``). Minimised over ``log T`` by
    ``scipy.optimize.minimize_scalar`` in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``; the NLL is convex
    in ``1 / T``, so the bounded search finds its one minimum. A ``ValueError`` when there is none
    inside the bounds: a split the model classifies entirely right (NLL falls as ``T → 0``: nothing
    to calibrate against) or entirely wrong.
    """
    from scipy.optimize import minimize_scalar

    y, p = _inputs(y_true, y_prob, task)
    z = _logits(p, task)
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    result = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t), task),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-5},
    )
    log_t = float(result.x)
    if not result.success or not np.isfinite(result.fun):
        raise ValueError(f"temperature scaling did not converge: {result.message}")
    if log_t - lo < 1e-3 or hi - log_t < 1e-3:
        _, correct = _confidence_and_correct(y, p, task)
        bound = MIN_TEMPERATURE if log_t - lo < 1e-3 else MAX_TEMPERATURE
        raise ValueError(
            f"temperature scaling: expected a split with both right and wrong predictions to fit "
            f"a temperature on, received {p.shape[0]} examples, {int(correct.sum())} of "
            f"{correct.size} predictions right: the likelihood keeps growing towards T = {bound} "
            f"(the bound); use a larger validation split, or leave the temperature at 1"
        )
    return math.exp(log_t)


@dataclass(frozen=True)
class Calibration:
    """A temperature and what it does on one split: ECE and NLL before and after."""

    temperature: float
    task: str
    split: str
    num_examples: int
    n_bins: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_temperature(
    y_true: Any,
    y_prob: Any,
    temperature: float,
    task: str,
    *,
    n_bins: int = DEFAULT_BINS,
    split: str = "test",
) -> Calibration:
    """ECE and NLL of ``y_prob`` before and after ``temperature``, on the split they come from."""
    temperature = check_temperature(temperature)
    n_bins = int(checks.positive_int("n_bins", n_bins))
    y, p = _inputs(y_true, y_prob, task)
    z = _logits(p, task)
    after = _scaled(z, temperature, task)
    return Calibration(
        temperature=temperature,
        task=task,
        split=str(split),
        num_examples=int(p.shape[0]),
        n_bins=n_bins,
        ece_before=expected_calibration_error(y, p, n_bins, task=task),
        ece_after=expected_calibration_error(y, after, n_bins, task=task),
        nll_before=_nll(z, y, 1.0, task),
        nll_after=_nll(z, y, temperature, task),
    )


def calibrate(
    y_true: Any,
    y_prob: Any,
    task: str,
    *,
    n_bins: int = DEFAULT_BINS,
    split: str = "validation",
) -> Calibration:
    """``fit_temperature`` on this (validation) split, with its ECE/NLL before and after there."""
    temperature = fit_temperature(y_true, y_prob, task)
    return evaluate_temperature(y_true, y_prob, temperature, task, n_bins=n_bins, split=split)


# --------------------------------------------------------------------------------------------------
# Withholding low-confidence answers.


def check_min_score(value: Any, name: str = "min_score") -> float:
    """``value`` as a float in [0, 1] (0: off), or a ``ValueError``."""
    return float(checks.interval(name, value, 0, 1, note=" (0 = off)"))


def withhold_low_scores(classes: Any, scores: Any, min_score: float) -> np.ndarray:
    """``classes`` ``[N, k]`` with every rank of each row whose top score (``scores[:, 0]``) is
    below ``min_score`` replaced by ``UNKNOWN`` (bytes if ``classes`` holds bytes). Scores are not
    changed: they say how sure the model was. ``min_score`` 0 changes nothing."""
    min_score = check_min_score(min_score)
    classes = np.array(classes, dtype=object)
    scores = np.asarray(scores)
    if classes.ndim != 2 or scores.shape[:1] != classes.shape[:1] or scores.ndim != 2:
        raise ValueError(
            f"expected classes and scores of shape [N, k], received {list(classes.shape)} and "
            f"{list(scores.shape)}"
        )
    if min_score > 0 and classes.size:
        unknown = UNKNOWN.encode() if isinstance(classes.flat[0], bytes) else UNKNOWN
        classes[scores[:, 0] < min_score] = unknown
    return classes
