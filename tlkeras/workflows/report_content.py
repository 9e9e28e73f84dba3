"""What ``report.html`` shows, computed: the top-loss gallery (ranked by per-example loss, with
Grad-CAM overlays), the most-confused class pairs, test-time augmentation's gain, the data audit and
the files a run already wrote (``run_content`` for a training run, ``export_content`` for an export
scored on new images). ``tlkeras.workflows.report_html`` renders it as one page.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image

from tlkeras import progress
from tlkeras.analysis import audit as audit_lib
from tlkeras.analysis import calibration, gradcam, tta
from tlkeras.exports.signatures import EXPLAIN_SIGNATURE
from tlkeras.fitting.evaluation import outputs_of
from tlkeras.fitting.rundir import CONFUSION_PNG, HISTORY_PNG
from tlkeras.models.spec import get_spec
from tlkeras.models.task import infer, probabilities

_EPS = 1e-7


@dataclass(frozen=True)
class GalleryItem:
    """One test image of the top-loss gallery."""

    item: str  # file path (relative to the data source) or index
    true: str
    predicted: str
    probability: float  # the model's probability of ``predicted``
    true_probability: float
    loss: float
    thumbnail: np.ndarray  # uint8 [h, w, 3]
    overlay: np.ndarray | None = None  # Grad-CAM over the thumbnail, uint8 [h, w, 3]


@dataclass
class ReportContent:
    """Everything the page shows; ``None``/empty sections say why they are empty."""

    title: str
    metrics: Mapping[str, Any]  # metrics.json (or evaluate's metrics): accuracy, per_class, ...
    task: str = "multiclass"
    history_png: bytes | None = None
    confusion_png: bytes | None = None
    gallery: list[GalleryItem] = field(default_factory=list)
    gallery_note: str = ""
    calibration: Mapping[str, Any] | None = None
    reliability_png: bytes | None = None
    tta: Mapping[str, Any] | None = None
    audit: Mapping[str, Any] | None = None
    notes: dict[str, str] = field(default_factory=dict)  # section id -> why it is empty


# --------------------------------------------------------------------------------------------------
# Ranking: top losses and most-confused pairs.


def per_example_loss(y_true: np.ndarray, y_prob: np.ndarray, task: str) -> np.ndarray:
    """Cross-entropy of each example: ``-log p(true)`` for one label per image (``y_prob`` one
    column per class), the summed binary cross-entropy over classes for multi-label."""
    p = np.clip(np.asarray(y_prob, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(y_true)
    if task == "multilabel":
        t = (y >= 0.5).astype(np.float64)
        return -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum(axis=1)
    return -np.log(p[np.arange(len(y)), y.astype(int)])


def top_losses(y_true: np.ndarray, y_prob: np.ndarray, task: str, k: int) -> np.ndarray:
    """Indices of the ``k`` highest-loss examples, highest first (fastai's ``top_losses``)."""
    loss = per_example_loss(y_true, y_prob, task)
    return np.argsort(-loss, kind="stable")[: max(0, k)]


def most_confused(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], k: int = 10
) -> list[tuple[str, str, int]]:
    """Off-diagonal ``(true, predicted, count)`` pairs, most frequent first (fastai's
    ``most_confused``); pairs never confused are left out."""
    m = np.asarray(confusion)
    pairs = [
        (class_names[i], class_names[j], int(m[i, j]))
        for i in range(m.shape[0])
        for j in range(m.shape[1])
        if i != j and m[i, j] > 0
    ]
    return sorted(pairs, key=lambda t: -t[2])[:k]


def label_text(y: np.ndarray | int, class_names: Sequence[str], task: str) -> str:
    """A label (int, or multi-hot row for multi-label) as class names."""
    if task == "multilabel":
        names = [class_names[i] for i in np.flatnonzero(np.asarray(y) >= 0.5)]
        return ", ".join(names) or "(none)"
    return str(class_names[int(y)])


def gallery_items(
    indices: Sequence[int],
    y_true: np.ndarray,
    y_prob: np.ndarray,
    task: str,
    class_names: Sequence[str],
    items: Sequence[str],
    images: np.ndarray,
    overlays: np.ndarray | None = None,
) -> list[GalleryItem]:
    """The gallery rows for ``indices`` (images: the test images at those indices, in that order;
    overlays likewise)."""
    loss = per_example_loss(y_true, y_prob, task)
    out = []
    for n, i in enumerate(indices):
        p = np.asarray(y_prob[i])
        if task == "multilabel":
            predicted = label_text(p, class_names, task)
            prob = float(p.max())
            true_p = float(np.mean(np.where(np.asarray(y_true[i]) >= 0.5, p, 1 - p)))
        else:
            j = int(np.argmax(p))
            predicted, prob = str(class_names[j]), float(p[j])
            true_p = float(p[int(y_true[i])])
        out.append(
            GalleryItem(
                item=str(items[i]) if i < len(items) else f"index {i}",
                true=label_text(y_true[i], class_names, task),
                predicted=predicted,
                probability=prob,
                true_probability=true_p,
                loss=float(loss[i]),
                thumbnail=thumbnail(images[n]),
                overlay=None if overlays is None else thumbnail(overlays[n]),
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# Images.

THUMBNAIL = 160  # longest side, pixels


def thumbnail(image: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """uint8 RGB with the longest side at most ``size`` (aspect kept)."""

    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    im = Image.fromarray(a)
    im.thumbnail((size, size))
    return np.asarray(im)


def png_bytes(image: np.ndarray) -> bytes:

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def read_png(path: str | Path) -> bytes | None:
    path = Path(path)
    return path.read_bytes() if path.is_file() else None


# --------------------------------------------------------------------------------------------------
# A training run's report: computed from the trained model, its data and metrics.json.

GALLERY_SIZE = 12
RELIABILITY_PNG = "reliability.png"
AUDIT_JSON = "audit.json"


def _images_at(dataset: Any, indices: Sequence[int]) -> np.ndarray:
    """The images of an unshuffled batched dataset at ``indices`` (in that order)."""
    wanted = {int(i): n for n, i in enumerate(indices)}
    out: list[Any] = [None] * len(indices)
    start = 0
    for x, _ in dataset:
        x = np.asarray(x)
        for i in range(start, start + len(x)):
            if i in wanted:
                out[wanted[i]] = x[i - start]
        start += len(x)
        if all(o is not None for o in out):
            break
    return np.stack(out)


def _tta_gain(model: Any, data: Any, y_true: np.ndarray, y_prob: np.ndarray, task: str) -> dict:
    """Test accuracy without and with a mirrored view averaged in (``tlkeras.analysis.tta``). ``y_prob``
    (the plain view, one column per class) is already known: only the other views are run."""
    config = tta.TTAConfig(flip=True)
    predict = keras_predict(model)
    batches = [
        [as_columns(predict(v), task) for v in config.views(x)[1:]] for x, _ in data.ordered("test")
    ]
    averaged = tta.average([y_prob, *(np.concatenate(v) for v in zip(*batches, strict=True))])

    def accuracy(p: np.ndarray) -> float:
        if task == "multilabel":
            return float(np.mean(np.all((p >= 0.5) == (y_true >= 0.5), axis=1)))
        return float(np.mean(np.argmax(p, axis=1) == y_true))

    plain, with_tta = accuracy(y_prob), accuracy(averaged)
    return {
        "views": "image + horizontal mirror",
        "test_accuracy": plain,
        "test_accuracy_with_tta": with_tta,
        "gain": with_tta - plain,
        "use_it": "scripts/evaluate.py / predict.py --tta=flip, or bake it into an export: "
        "scripts/export.py --tta=flip",
    }


def keras_predict(model: Any):
    """A batch of pixels -> the model's probabilities (a plain call: no ``predict`` loop)."""

    task, from_logits = infer(model)
    fn = outputs_of(model)  # the evaluation's trace
    return lambda x: np.asarray(probabilities(fn(x), task, from_logits=from_logits))


def as_columns(y_prob: np.ndarray, task: str) -> np.ndarray:
    """One column per class: a binary model's single unit becomes ``[1 - p, p]``."""
    p = np.asarray(y_prob, dtype=np.float32)
    if task == "binary":
        p = p.reshape(len(p), -1)[:, -1:]
        return np.concatenate([1.0 - p, p], axis=1)
    return p


def run_content(
    model: Any,
    data: Any,
    metrics: Mapping[str, Any],
    run_dir: str | Path,
    *,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    gallery_size: int = GALLERY_SIZE,
    audit: bool = True,
    features: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> ReportContent:
    """Everything ``report.html`` shows for a run: the test predictions (``(y_true, y_prob)``,
    probabilities, ``data.test``'s order), the top-loss gallery with Grad-CAM, TTA's gain, the data
    audit (written to ``audit.json`` too) and the files the run already wrote (curves, confusion,
    reliability diagram). ``features``: ``{split: (pooled features, labels)}`` the audit need not
    compute again (``tlkeras.analysis.audit.audit``)."""

    run_dir = Path(run_dir)
    task = infer(model)[0]
    names = list(data.class_names)
    content = ReportContent(
        title=f"{run_dir.name}: {(metrics.get('run') or {}).get('backbone', model.name)}",
        metrics=metrics,
        task=task,
        history_png=read_png(run_dir / HISTORY_PNG),
        confusion_png=read_png(run_dir / CONFUSION_PNG),
        calibration=metrics.get("calibration"),
        reliability_png=read_png(run_dir / RELIABILITY_PNG),
    )
    if not metrics.get("calibration"):
        content.notes["calibration"] = metrics.get(
            "calibration_note", "Not measured (no validation split to fit a temperature on)."
        )
    if test is None or data.ordered("test") is None:
        for section in ("top-losses", "tta"):
            content.notes[section] = "No test split: nothing was held out to show."
    else:
        y_true, y_prob = test
        y_prob = as_columns(y_prob, task)
        indices = top_losses(y_true, y_prob, task, gallery_size)
        images = _images_at(data.ordered("test"), indices)
        try:
            heat = gradcam.gradcam(model, images)
            overlays = np.stack([gradcam.overlay(i, h) for i, h in zip(images, heat, strict=True)])
        except ValueError as e:  # e.g. no spatial block to explain
            overlays = None
            content.gallery_note = f"No Grad-CAM: {e}"
        items = data.items.get("test", [])
        content.gallery = gallery_items(
            indices, y_true, y_prob, task, names, items, images, overlays
        )
        if content.gallery_note == "":
            content.gallery_note = (
                f"The {len(indices)} test images with the highest loss, each beside its Grad-CAM "
                "heat map (where the model looked for the class it predicted)."
            )
        augment = getattr(get_spec(model), "augment", None) if _has_spec(model) else None
        if augment is not None and "horizontal" in getattr(augment, "flip", ""):
            content.tta = _tta_gain(model, data, y_true, y_prob, task)
        else:
            content.notes["tta"] = (
                "Not measured: the model was not trained with horizontal flips, so a mirrored "
                "image need not be the same class (digits, text)."
            )
    if audit:
        try:
            embed = model.get_layer("pool")
        except ValueError:
            content.notes["audit"] = "Not run: the model has no 'pool' layer to take features from."
        else:
            extractor = keras.Model(model.inputs, embed.output)
            with progress.step("audit"):
                result = audit_lib.audit(data, extractor, features=features)
            result.write_json(run_dir / AUDIT_JSON)
            content.audit = {**result.to_dict(), "summary": result.summary()}
    else:
        content.notes["audit"] = "Not run (turned off)."
    return content


def _has_spec(model: Any) -> bool:

    try:
        get_spec(model)
    except (ValueError, AttributeError, KeyError):
        return False
    return True


def export_content(
    exported: Any,
    data: Any,
    metrics: Mapping[str, Any],
    scored: tuple[np.ndarray, np.ndarray],
    output_dir: str | Path,
    *,
    gallery_size: int = GALLERY_SIZE,
) -> ReportContent:
    """The page for an export scored on new images (``tlkeras.workflows.evaluate.evaluate_export``):
    ``scored`` is ``(labels, probabilities)`` over ``data.ordered("train")`` (the whole folder).
    Grad-CAM comes from the export's ``explain`` signature when it has one; no training curves and
    no audit (``scripts/audit.py`` audits a folder)."""

    output_dir = Path(output_dir)
    task = exported.metadata.get("task", "multiclass")
    names = list(exported.class_names)
    y_true, y_prob = scored
    content = ReportContent(
        title=f"{exported.path} on {data.source}",
        metrics=metrics,
        task=task,
        confusion_png=read_png(output_dir / CONFUSION_PNG),
    )
    content.notes["curves"] = (
        "An export scored on new images: its training curves are in its run's report."
    )
    content.notes["audit"] = f"Not run here: python scripts/audit.py --data={data.source}"
    indices = top_losses(y_true, y_prob, task, gallery_size)
    images = _images_at(data.ordered("train"), indices)
    items = data.items.get("train", [])
    overlays = None
    if EXPLAIN_SIGNATURE not in getattr(exported, "signatures", {}):
        content.gallery_note = (
            "No Grad-CAM: the export has no 'explain' signature (scripts/export.py --explain)."
        )
    else:
        files = [Path(data.source) / items[i] for i in indices]
        heat = exported.explain_bytes([f.read_bytes() for f in files])["heatmaps"]
        overlays = np.stack([gradcam.overlay(i, h) for i, h in zip(images, heat, strict=True)])
    content.gallery = gallery_items(indices, y_true, y_prob, task, names, items, images, overlays)
    if task != "multilabel":
        curve = calibration.reliability_curve(y_true, y_prob, task=task)
        path = calibration.plot_reliability(
            curve, None, output_dir / RELIABILITY_PNG, labels=("this data", "")
        )
        temperature = (exported.metadata.get("calibration") or {}).get("temperature", 1.0)
        content.calibration = {
            "expected_calibration_error": curve.ece,
            "export_temperature": temperature,
        }
        content.reliability_png = read_png(path)
    else:
        content.notes["calibration"] = "Not measured for multi-label exports."
    if metrics.get("tta"):
        t = metrics["tta"]
        content.tta = {
            "views": t.get("spec"),
            "accuracy": t["accuracy_without"],
            "accuracy_with_tta": t["accuracy_with"],
            "gain": t["gain"],
        }
    else:
        content.notes["tta"] = "Not measured: score with --tta=flip to see its gain."
    return content
