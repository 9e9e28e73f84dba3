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
is :mod:`tlkeras.workflows.report_content`'s (``run_content`` for a run, ``export_content`` for an
export scored on new images); this module only formats and renders.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tlkeras.workflows.report_content import ReportContent, most_confused, png_bytes

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


def _img(png: bytes | None, alt: str, css: str = "") -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


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
