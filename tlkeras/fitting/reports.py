"""Run reports: metrics, history files, plots and the one-screen end summary.

Everything that scikit-learn and matplotlib already compute is delegated to them
(``classification_report``, ``confusion_matrix``, ``ConfusionMatrixDisplay``); this module only
arranges their output into the files a run directory holds:

- ``history.json`` / ``history.csv``: one row per epoch across both phases, with a ``phase`` column
  and the phase-boundary epoch in the JSON;
- ``history.png``: loss/accuracy curves with the phase boundary marked;
- ``confusion.png``: the test-set confusion matrix;
- ``metrics.json``: written by :mod:`tlkeras.workflows.training` from :func:`classification_metrics`.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras.fitting.rundir import (  # noqa: F401  (re-exported: reports write these files)
    CONFUSION_PNG,
    HISTORY_CSV,
    HISTORY_JSON,
    HISTORY_PNG,
    METRICS_JSON,
    to_jsonable,
    write_json,
)


def _labels_from(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels from int labels, one-hot rows, or binary ``[N, 1]`` probabilities/targets."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        return np.argmax(y, axis=1)
    if np.issubdtype(y.dtype, np.floating):
        return (y >= 0.5).astype(np.int64) if num_classes == 2 else y.astype(np.int64)
    return y.astype(np.int64)


def _scores(row: dict[str, Any], *, support: bool) -> dict[str, Any]:
    """One row of scikit-learn's ``classification_report(output_dict=True)`` as plain numbers."""
    out: dict[str, Any] = {
        "precision": float(row["precision"]),
        "recall": float(row["recall"]),
        "f1": float(row["f1-score"]),
    }
    if support:
        out["support"] = int(row["support"])
    return out


def classification_metrics(
    y_true: np.ndarray | Sequence[int],
    y_prob: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix, JSON-ready.

    Args:
        y_true: int labels ``[N]`` (or one-hot ``[N, C]``).
        y_prob: model outputs: class probabilities ``[N, C]``, or one sigmoid unit ``[N, 1]``/``[N]``
            for a binary model (``p`` of class 1).
        class_names: ``C`` names, index-aligned with the labels.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    class_names = [str(c) for c in class_names]
    if len(class_names) < 2:
        raise ValueError(f"expected at least 2 class names, received {class_names!r}")
    num_classes = len(class_names)
    y_prob = np.asarray(y_prob)
    if y_prob.ndim == 2 and y_prob.shape[1] not in (1, num_classes):
        raise ValueError(
            f"expected y_prob with 1 or {num_classes} columns (one per class name), "
            f"received shape {y_prob.shape}"
        )
    true = _labels_from(np.asarray(y_true), num_classes)
    pred = _labels_from(y_prob, num_classes)
    if true.shape[0] != pred.shape[0]:
        raise ValueError(
            f"expected as many labels as predictions, received {true.shape[0]} labels and "
            f"{pred.shape[0]} predictions"
        )
    labels = list(range(num_classes))
    report = classification_report(
        true, pred, labels=labels, target_names=class_names, output_dict=True, zero_division=0
    )
    per_class = {name: _scores(report[name], support=True) for name in class_names}
    averages = {
        key: _scores(report[key], support=False)
        for key in ("macro avg", "weighted avg")
        if key in report
    }
    return {
        "accuracy": float(accuracy_score(true, pred)) if len(true) else float("nan"),
        "num_examples": int(len(true)),
        "class_names": class_names,
        "per_class": per_class,
        "macro_avg": averages.get("macro avg"),
        "weighted_avg": averages.get("weighted avg"),
        "confusion_matrix": confusion_matrix(true, pred, labels=labels).tolist(),
    }


def multilabel_metrics(
    y_true: np.ndarray, y_score: np.ndarray, class_names: Sequence[str], from_logits: bool = False
) -> dict[str, Any]:
    """Subset accuracy, per-class P/R/F1 and per-class 2×2 confusion matrices for multi-hot labels."""
    from sklearn.metrics import accuracy_score, classification_report, multilabel_confusion_matrix

    class_names = [str(c) for c in class_names]
    true = (np.asarray(y_true) >= 0.5).astype(int)
    pred = (np.asarray(y_score) >= (0.0 if from_logits else 0.5)).astype(int)
    report = classification_report(
        true, pred, target_names=class_names, output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(true, pred)),
        "num_examples": int(len(true)),
        "class_names": class_names,
        "per_class": {name: _scores(report[name], support=True) for name in class_names},
        "confusion_matrix": multilabel_confusion_matrix(true, pred).tolist(),
    }


def write_history(
    history: Mapping[str, Sequence[Any]], run_dir: str | Path, phase_boundary: int | None
) -> tuple[Path, Path]:
    """Write the merged per-epoch history as ``history.json`` and ``history.csv``.

    Args:
        history: column name -> one value per epoch (as ``keras.callbacks.History.history``),
            ideally with ``epoch`` and ``phase`` columns.
        phase_boundary: the first epoch (0-based) of phase 2, ``None`` for single-phase runs.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    columns = {k: list(v) for k, v in history.items()}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"expected history columns of equal length, received lengths {lengths}")
    json_path = write_json(
        {"phase_boundary": phase_boundary, "history": columns}, run_dir / HISTORY_JSON
    )
    csv_path = run_dir / HISTORY_CSV
    n = lengths.pop() if lengths else 0
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        for i in range(n):
            writer.writerow([columns[k][i] for k in columns])
    return json_path, csv_path


def pyplot():
    """matplotlib's ``pyplot`` on the Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_history(
    history: Mapping[str, Sequence[Any]],
    path: str | Path,
    phase_boundary: int | None = None,
    title: str | None = None,
) -> Path:
    """Loss and accuracy curves (train and validation) with the phase boundary as a dashed line."""
    plt = pyplot()
    path = Path(path)
    epochs = list(history.get("epoch") or range(len(history.get("loss", []))))
    epochs = [e + 1 for e in epochs]  # 1-based, as Keras prints them
    panels = [m for m in ("loss", "accuracy") if m in history]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.6))
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, panels, strict=False):
        ax.plot(epochs, history[metric], marker=".", label=f"train {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker=".", label=f"validation {metric}")
        if phase_boundary is not None:
            ax.axvline(
                phase_boundary + 0.5, color="gray", linestyle="--", label="fine-tuning starts"
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """The confusion matrix as a PNG via scikit-learn's ``ConfusionMatrixDisplay``."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    path = Path(path)
    n = len(class_names)
    size = min(max(4.0, 0.5 * n + 2.0), 20.0)
    fig, ax = plt.subplots(figsize=(size, size))
    display = ConfusionMatrixDisplay(np.asarray(confusion), display_labels=list(class_names))
    display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if n > 5 else "horizontal")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, float):
        return format(value, spec)
    return "-" if value is None else str(value)


def _refit_text(refit: Mapping[str, Any]) -> str:
    if "C" in refit:
        return f"{refit['examples']} examples, re-solved at C={refit['C']:g}"
    return f"{refit['examples']} examples, {refit['epochs']} epochs"


def summary_text(metrics: Mapping[str, Any], *, max_classes: int = 20) -> str:
    """The one-screen end-of-run summary from a ``metrics.json`` dict."""
    lines = []
    run = metrics.get("run", {})
    if run:
        lines.append(
            f"Run: {run.get('backbone', '?')} strategy={run.get('strategy', '?')} "
            f"fine_tune_at={run.get('fine_tune_at')} dir={run.get('run_dir', '?')}"
        )
    for phase in metrics.get("phases", []):
        solver = phase.get("solver") or {}
        lines.append(
            f"  phase {phase['phase']} ({phase['name']}): epochs {phase['epochs_run']}, "
            f"trainable params {phase['trainable_params']:,}, "
            f"{phase['wall_time_s']:.1f} s"
            + (f", fast path: {phase['fast_path']}" if phase.get("fast_path") else "")
            + (
                f", head solved by L-BFGS (C={solver['C']:g}, chosen by {solver['selected_by']})"
                if solver.get("method") == "lbfgs"
                else ""
            )
            + (
                f", refit on train + validation ({_refit_text(phase['refit'])})"
                if phase.get("refit")
                else ""
            )
        )
    kept = metrics.get("kept")
    if kept:
        lines.append(
            f"Kept: phase {kept['phase']} ({kept['name']}), epoch {kept['epoch']}, "
            f"{kept['monitor']} {kept['value']:.4f}"
            + (f" — {kept['note']}" if kept.get("note") else "")
        )
    test = metrics
    if "accuracy" in test:
        where = test.get("evaluated_on")
        label = "Test accuracy" if where in ("test", None) else f"Accuracy on {where}"
        lines.append(f"{label}: {_fmt(test['accuracy'])} on {test.get('num_examples', '?')} images")
        per_class = test.get("per_class", {})
        if per_class:
            width = max(len(n) for n in per_class) if per_class else 5
            width = max(width, 5)
            lines.append(f"  {'class':<{width}}  precision  recall  f1      support")
            for name in list(per_class)[:max_classes]:
                row = per_class[name]
                lines.append(
                    f"  {name:<{width}}  {row['precision']:.3f}      {row['recall']:.3f}   "
                    f"{row['f1']:.3f}   {row['support']}"
                )
            if len(per_class) > max_classes:
                lines.append(f"  ... {len(per_class) - max_classes} more classes in metrics.json")
    skipped = metrics.get("skipped") or (metrics.get("data") or {}).get("skipped") or []
    if skipped:
        lines.append(f"Skipped {len(skipped)} file(s):")
        for item in skipped[:5]:
            lines.append(f"  {item.get('path')}: {item.get('reason')}")
        if len(skipped) > 5:
            lines.append(f"  ... {len(skipped) - 5} more in metrics.json")
    if metrics.get("export"):
        lines.append(f"Exported SavedModel: {metrics['export']}")
    return "\n".join(lines)
