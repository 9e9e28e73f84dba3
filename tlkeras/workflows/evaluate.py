"""Score an export on labelled images: ``scripts/evaluate.py`` and ``scripts/report.py --model``.

:func:`evaluate_export` runs a SavedModel (or an edge export) through its float signature on every
image of a labelled source, with optional test-time augmentation, and writes ``metrics.json``,
``confusion.png`` and ``report.html``. :func:`labelled_pixels` decodes a labelled folder as
training decodes it, with labels in the model's class order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import data as data_lib
from tlkeras.analysis import tta as tta_lib
from tlkeras.analysis.calibration import expected_calibration_error
from tlkeras.data import dataset_arrays
from tlkeras.exports.loading import load_exported
from tlkeras.fitting import reports
from tlkeras.fitting.run import DEFAULT_OUTPUT_ROOT
from tlkeras.workflows import report_content, report_html


def default_evaluate_dir(model_path: str | Path) -> Path:
    """``runs/evaluate/<the export's last two folders>``: ``NAME/VERSION`` for a SavedModel,
    ``VERSION/FORMAT`` for an edge export (its folder, not its model file)."""
    path = Path(model_path).resolve()
    folder = path.parent if path.is_file() else path
    return Path(DEFAULT_OUTPUT_ROOT, "evaluate", *folder.parts[-2:])


def evaluate_export(
    model_path: str | Path,
    data_source: Any,
    *,
    batch_size: int = 32,
    output_dir: str | Path | None = None,
    verbose: int = 1,
    max_bad_fraction: float = data_lib.DataConfig.max_bad_fraction,
    tta: tta_lib.TTAConfig | str | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Score an exported SavedModel on every image of ``data_source`` (no split).

    The model runs through its float signature (``tf.saved_model.load``; no tlkeras model code).
    Folder classes are matched to the model's labels by name, so a folder may hold a subset of the
    classes. Writes ``metrics.json`` and ``confusion.png`` to ``output_dir`` when given.
    ``max_bad_fraction``: as ``tlkeras.data.load``. ``tta``: score the mean over these test-time
    views (``tlkeras.analysis.tta``; client side, on the float signature); ``metrics["tta"]`` then holds the
    accuracy without and with it (one pass: the first view is the image itself).
    ``report``: with ``output_dir``, also ``report.html`` there (``tlkeras.workflows.report_html``: top
    losses with the export's Grad-CAM, calibration, TTA).
    ``metrics["expected_calibration_error"]``: top-label ECE of the scored probabilities
    (``tlkeras.analysis.calibration``; not for multi-label exports).
    """
    tta = tta_lib.check(tta)
    exported = load_exported(model_path)
    if tta is not None:
        tta_lib.refuse_baked_in(exported)
    names = list(exported.class_names)
    if not names:
        raise ValueError(
            f"model: expected a tlkeras export with assets.extra/labels.txt, received {model_path}"
        )
    data, to_model = _load_labelled(
        data_source,
        names,
        exported.input_size,
        batch_size=batch_size,
        max_bad_fraction=max_bad_fraction,
    )
    y_true, y_prob, plain = _scores(exported, data, to_model, tta)
    metrics = reports.classification_metrics(y_true, y_prob, names)
    if exported.metadata.get("task") != "multilabel":
        metrics["expected_calibration_error"] = expected_calibration_error(y_true, y_prob)
    if tta is not None:
        without = reports.classification_metrics(y_true, plain, names)["accuracy"]
        metrics["tta"] = {
            **tta.to_dict(),
            "accuracy_without": without,
            "accuracy_with": metrics["accuracy"],
            "gain": metrics["accuracy"] - without,
        }
    data_dict = data.to_dict()
    metrics.update(
        {
            "evaluated_on": str(data_source),
            "model": str(exported.path),
            "counts": data_dict.get("counts"),
            "skipped": data_dict.get("skipped", []),
            "data": data_dict,
        }
    )
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        reports.write_json(metrics, output_dir / reports.METRICS_JSON)
        reports.plot_confusion(
            metrics["confusion_matrix"], names, output_dir / reports.CONFUSION_PNG
        )
        if report:
            content = report_content.export_content(
                exported, data, metrics, (y_true, y_prob), output_dir
            )
            metrics["report"] = str(
                report_html.write(content, output_dir / report_html.REPORT_HTML)
            )
    if verbose:
        print(reports.summary_text(metrics))
        if tta is not None:
            t = metrics["tta"]
            print(
                f"test-time augmentation ({t['spec']}, {len(t['views'])} views): accuracy "
                f"{t['accuracy_without']:.4f} without, {t['accuracy_with']:.4f} with "
                f"({100 * t['gain']:+.1f} points)"
            )
    return metrics


def _scores(
    exported: Any, data: Any, to_model: np.ndarray, tta: tta_lib.TTAConfig | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels in the model's classes, probabilities, probabilities without TTA)`` of every
    image of ``data`` in ``data.items`` order (for the report), each batch in one pass: the first
    view is the image itself."""

    def both(x: Any) -> np.ndarray:
        per_view = tta_lib.view_probabilities(
            lambda v: exported.predict_pixels(v)["probabilities"], x.numpy(), tta
        )
        return np.stack([per_view[0], tta_lib.average(per_view)], axis=1)

    probs, labels = dataset_arrays(data.ordered("train"), map_images=both)
    return to_model[labels], probs[:, 1], probs[:, 0]


def labelled_pixels(
    folder: Any,
    class_names: Sequence[str],
    image_size: tuple[int, int],
    limit: int | None = None,
    max_bad_fraction: float = data_lib.DataConfig.max_bad_fraction,
) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a labelled folder (one subfolder per class, a subset of ``class_names``)
    decoded as training decodes it, with its index in ``class_names``; bad files skipped (up to
    ``max_bad_fraction``, as ``tlkeras.data.load``)."""
    data, to_model = _load_labelled(
        folder, list(class_names), image_size, max_bad_fraction=max_bad_fraction
    )
    pixels, labels = dataset_arrays(data.train, limit=limit, dtype="float32")
    return pixels, to_model[labels]


def _load_labelled(
    data_source: Any, names: list[str], image_size: tuple[int, int], **load_kwargs: Any
) -> tuple[Any, np.ndarray]:
    """All of ``data_source`` (no split) and, per class of it, that class's index in the model's
    ``names``: folders may hold a subset of the model's classes, none outside them."""
    data = data_lib.load(
        data_source, image_size=image_size, validation_split=0.0, test_split=0.0, **load_kwargs
    )
    unknown = [c for c in data.class_names if c not in names]
    if unknown:
        raise ValueError(
            f"data: expected class folders among the model's classes {names}, received "
            f"unknown classes {unknown}"
        )
    return data, np.array([names.index(c) for c in data.class_names])
