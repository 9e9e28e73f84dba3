"""``report.html``: one self-contained page per run — what the model learned and where it fails.

Sections (each an element with a stable ``id``, so tests and users can find them): ``summary`` (data,
strategy, phases, times, trainable params), ``curves`` (loss/accuracy with the phase boundary),
``confusion``, ``per-class`` (precision/recall/F1), ``most-confused`` (class pairs), ``top-losses``
(the test images the model is most wrong about, with Grad-CAM overlays), ``skipped`` (files left out
or converted, with reasons), ``calibration`` (ECE and reliability before/after temperature scaling),
``tta`` (test-time augmentation's gain) and ``audit`` (near-duplicates, split leaks, suspected
mislabels).

Why one static file: it opens in any browser, offline, and can be mailed or attached to a ticket;
every image is embedded as a ``data:`` PNG and there is no network request. Computing what goes in it
is :mod:`tlkeras.workflows.training`'s (a run) and :func:`tlkeras.workflows.report_html.export_report`'s (an export
scored on new images); this module only ranks, formats and renders.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from tlkeras.analysis import audit as audit_lib
from tlkeras.analysis import calibration, gradcam, tta
from tlkeras.exports.signatures import EXPLAIN_SIGNATURE
from tlkeras.fitting.rundir import CONFUSION_PNG, HISTORY_PNG
from tlkeras.models.spec import get_spec
from tlkeras.models.task import infer, probabilities

REPORT_HTML = "report.html"
# Sections in page order: (id, heading).
SECTIONS = (
    ("summary", "Run"),
    ("curves", "Training curves"),
    ("confusion", "Confusion matrix"),
    ("per-class", "Per-class precision, recall, F1"),
    ("most-confused", "Most-confused classes"),
    ("top-losses", "Top losses"),
    ("skipped", "Skipped and converted files"),
    ("calibration", "Calibration"),
    ("tta", "Test-time augmentation"),
    ("audit", "Data audit"),
)
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


def _img(png: bytes | None, alt: str, css: str = "") -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def read_png(path: str | Path) -> bytes | None:
    path = Path(path)
    return path.read_bytes() if path.is_file() else None


# --------------------------------------------------------------------------------------------------
# Rendering.

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:1.5em;color:#222}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.muted{color:#777}.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;width:340px;font-size:12px}
.card img{max-width:160px;vertical-align:top}.bad{color:#b00}.plot{max-width:100%}
nav a{margin-right:.8em}code{background:#f3f3f3;padding:0 .2em}
"""
# Marks the page once loaded: how many images it has and how many failed to decode (a headless
# browser test reads these attributes back).
_SCRIPT = """
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, spec: str = ".3f") -> str:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return format(value, spec)
    return "–"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _empty(content: ReportContent, section: str, default: str) -> str:
    return f'<p class="muted">{_e(content.notes.get(section, default))}</p>'


def _summary(c: ReportContent) -> str:
    m = c.metrics
    run = m.get("run") or {}
    data = m.get("data") or {}
    rows = [
        ("data", data.get("source") or m.get("evaluated_on") or "?"),
        ("classes", ", ".join(m.get("class_names") or data.get("class_names") or [])),
        ("task", c.task),
    ]
    counts = m.get("counts") or data.get("counts") or {}
    if counts:
        rows.append(("images", ", ".join(f"{s} {sum(v.values())}" for s, v in counts.items() if v)))
    if run:
        rows += [
            ("backbone", run.get("backbone")),
            ("strategy", f"{run.get('strategy')} (fine_tune_at={run.get('fine_tune_at')})"),
        ]
    if m.get("model"):
        rows.append(("model", m["model"]))
    if "accuracy" in m:
        where = m.get("evaluated_on") or "test"
        where = "the test split" if where == "test" else where
        rows.append(
            (
                "accuracy",
                f"{_num(m['accuracy'], '.4f')} on {m.get('num_examples', '?')} images of {where}",
            )
        )
    kept = m.get("kept")
    if kept:  # which phase's weights the model holds; fine-tuning that only lost says so
        rows.append(
            (
                "kept",
                f"phase {kept['phase']} ({kept['name']}), epoch {kept['epoch']}, "
                f"{kept['monitor']} {_num(kept['value'], '.4f')}"
                + (f" — {kept['note']}" if kept.get("note") else ""),
            )
        )
    out = _table(("", ""), [(k, v) for k, v in rows])
    phases = m.get("phases") or []
    if phases:
        out += _table(
            ("phase", "name", "epochs", "trainable params", "wall time s"),
            [
                (
                    p.get("phase"),
                    p.get("name"),
                    p.get("epochs_run"),
                    f"{p.get('trainable_params', 0):,}",
                    _num(p.get("wall_time_s"), ".1f"),
                )
                for p in phases
            ],
        )
    return out


def _confusion(c: ReportContent) -> str:
    if c.confusion_png:
        return _img(c.confusion_png, "confusion matrix", "plot")
    matrix = c.metrics.get("confusion_matrix")
    names = list(c.metrics.get("class_names") or [])
    if matrix and c.task == "multilabel":  # one 2x2 matrix per class: [[TN, FP], [FN, TP]]
        return _table(
            ("class", "true negatives", "false positives", "false negatives", "true positives"),
            [(n, m[0][0], m[0][1], m[1][0], m[1][1]) for n, m in zip(names, matrix, strict=False)],
        )
    if matrix:
        return _table(
            ("true \\ predicted", *names), [(n, *r) for n, r in zip(names, matrix, strict=False)]
        )
    return _empty(c, "confusion", "No labelled evaluation split.")


def _per_class(c: ReportContent) -> str:
    per_class = c.metrics.get("per_class") or {}
    if not per_class:
        return _empty(c, "per-class", "No labelled evaluation split.")
    rows = [
        (n, _num(r["precision"]), _num(r["recall"]), _num(r["f1"]), r.get("support", ""))
        for n, r in per_class.items()
    ]
    for key, label in (("macro_avg", "macro average"), ("weighted_avg", "weighted average")):
        avg = c.metrics.get(key)
        if avg:
            rows.append((label, _num(avg["precision"]), _num(avg["recall"]), _num(avg["f1"]), ""))
    return _table(("class", "precision", "recall", "F1", "support"), rows)


def _most_confused(c: ReportContent) -> str:
    matrix = c.metrics.get("confusion_matrix")
    names = list(c.metrics.get("class_names") or [])
    if not matrix:
        return _empty(c, "most-confused", "No labelled evaluation split.")
    if c.task == "multilabel":
        rows = sorted(
            ((n, m[0][1], m[1][0]) for n, m in zip(names, matrix, strict=False)),
            key=lambda r: -(r[1] + r[2]),
        )
        return _table(("class", "false positives", "false negatives"), rows[:10])
    pairs = most_confused(matrix, names)
    if not pairs:
        return '<p class="muted">No class was mistaken for another.</p>'
    return _table(("true class", "predicted as", "images"), pairs)


def _gallery(c: ReportContent) -> str:
    if not c.gallery:
        return _empty(c, "top-losses", "No labelled evaluation split.")
    cards = []
    for g in c.gallery:
        wrong = g.predicted != g.true
        cards.append(
            '<div class="card">'
            + _img(png_bytes(g.thumbnail), g.item)
            + (_img(png_bytes(g.overlay), f"Grad-CAM {g.item}") if g.overlay is not None else "")
            + f"<div><b>{_e(g.item)}</b></div>"
            + f"<div>true: {_e(g.true)} (p={g.true_probability:.3f})</div>"
            + f'<div class="{"bad" if wrong else ""}">predicted: {_e(g.predicted)} '
            + f"(p={g.probability:.3f})</div>"
            + f'<div class="muted">loss {g.loss:.3f}</div></div>'
        )
    note = f'<p class="muted">{_e(c.gallery_note)}</p>' if c.gallery_note else ""
    return note + '<div class="gallery">' + "".join(cards) + "</div>"


def _skipped(c: ReportContent) -> str:
    data = c.metrics.get("data") or {}
    skipped = data.get("skipped", c.metrics.get("skipped")) or []
    notes = data.get("notes") or []
    out = ""
    if skipped:
        out += "<h3>Skipped</h3>" + _table(
            ("file", "reason"), [(s["path"], s["reason"]) for s in skipped]
        )
    if notes:
        out += "<h3>Used after a conversion</h3>" + _table(
            ("file", "conversion"), [(s["path"], s["reason"]) for s in notes]
        )
    for w in data.get("warnings") or []:
        out += f'<p class="bad">warning: {_e(w)}</p>'
    return out or '<p class="muted">Every file was used as it was.</p>'


def _calibration(c: ReportContent) -> str:
    cal = c.calibration
    if not cal:
        return _empty(c, "calibration", "Not measured.")
    rows = [
        (k.replace("_", " "), _num(v, ".4f") if isinstance(v, float) else v) for k, v in cal.items()
    ]
    text = (
        "<p>Expected calibration error (ECE): the gap between the model's confidence and its "
        "accuracy, averaged over confidence bins (0 is perfect). Temperature scaling divides the "
        "logits by one number fit on the validation split; predictions do not change, only how "
        "sure the probabilities are.</p>"
    )
    return text + _table(("", ""), rows) + _img(c.reliability_png, "reliability diagram", "plot")


def _tta(c: ReportContent) -> str:
    if not c.tta:
        return _empty(c, "tta", "Not measured.")
    rows = [
        (k.replace("_", " "), _num(v, ".4f") if isinstance(v, float) else v)
        for k, v in c.tta.items()
    ]
    return _table(("", ""), rows)


def _audit(c: ReportContent) -> str:
    """``tlkeras.analysis.audit``'s result: leaks and duplicates as image pairs, then suspected mislabels."""
    a = c.audit
    if not a:
        return _empty(c, "audit", "Not run.")
    out = f"<pre>{_e(a['summary'])}</pre>" if a.get("summary") else ""

    def side(x: Mapping[str, Any]) -> str:
        return f"{x.get('split')}: {x.get('item')} ({x.get('label')})"

    for key, count, title in (
        ("leaks", "leak_count", "Near-duplicates across splits (leaks)"),
        ("duplicates", "duplicate_count", "Near-duplicates within a split"),
    ):
        rows = a.get(key) or []
        out += f"<h3>{_e(title)}: {a.get(count, len(rows))}</h3>"
        if rows:
            out += _table(
                ("cosine similarity", "image", "its near-duplicate"),
                [(_num(r.get("similarity"), ".4f"), side(r["a"]), side(r["b"])) for r in rows],
            )
    rows = a.get("mislabels") or []
    out += f"<h3>Suspected mislabels: {a.get('mislabel_count', len(rows))}</h3>"
    if rows:
        out += _table(
            ("split", "image", "folder label", "probe says", "probability"),
            [
                (r["split"], r["item"], r["label"], r["predicted"], _num(r["confidence"]))
                for r in rows
            ],
        )
    return out


def render(content: ReportContent) -> str:
    """The whole page as one HTML string."""
    parts = {
        "summary": _summary(content),
        "curves": _img(content.history_png, "training curves", "plot")
        or _empty(content, "curves", "No history."),
        "confusion": _confusion(content),
        "per-class": _per_class(content),
        "most-confused": _most_confused(content),
        "top-losses": _gallery(content),
        "skipped": _skipped(content),
        "calibration": _calibration(content),
        "tta": _tta(content),
        "audit": _audit(content),
    }
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{parts[sid]}</section>' for sid, title in SECTIONS
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(content.title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(content.title)}</h1><nav>{nav}</nav>{body}<script>{_SCRIPT}</script>"
        "</body></html>"
    )


def write(content: ReportContent, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render(content), encoding="utf-8")
    return path


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
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
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
) -> ReportContent:
    """Everything ``report.html`` shows for a run: the test predictions (``(y_true, y_prob)``,
    probabilities, ``data.test``'s order), the top-loss gallery with Grad-CAM, TTA's gain, the data
    audit (written to ``audit.json`` too) and the files the run already wrote (curves, confusion,
    reliability diagram)."""

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
            result = audit_lib.audit(data, extractor)
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
    """The page for an export scored on new images (``tlkeras.workflows.training.evaluate_export``):
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
