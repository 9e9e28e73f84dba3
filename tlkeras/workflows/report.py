"""Rebuild the ``report.html`` of a finished run from its directory (``scripts/report.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras

from tlkeras import data as data_lib
from tlkeras.fitting import reports
from tlkeras.fitting.evaluation import predictions
from tlkeras.fitting.rundir import BEST_MODEL
from tlkeras.workflows import report_content, report_html


def report_run(run_dir: str | Path, data_source: Any = None, *, audit: bool = True) -> Path:
    """Rebuild ``report.html`` of a finished run from its directory: ``model.keras``,
    ``metrics.json``, and the data loaded again as the run loaded it (``ImageData.origin``, so the
    same split) — or from ``data_source`` with the same split settings. Returns the page's path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / reports.METRICS_JSON
    if not metrics_path.is_file() or not (run_dir / BEST_MODEL).is_file():
        raise FileNotFoundError(
            f"run_dir: expected a finished run directory with {reports.METRICS_JSON} and "
            f"{BEST_MODEL}, received {str(run_dir)!r}"
        )
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    origin = (metrics.get("data") or {}).get("origin")
    if origin is None and data_source is None:
        raise ValueError(
            f"data: the run in {str(run_dir)!r} was trained on in-memory arrays (or before data "
            "origins were recorded); expected the data given again (--data)"
        )
    origin = origin or {"validation": None, "config": {}}
    data = data_lib.load(
        data_source if data_source is not None else origin["source"],
        validation=origin["validation"],
        config=data_lib.DataConfig(**origin["config"]),
    )
    model = keras.saving.load_model(run_dir / BEST_MODEL)
    test = predictions(model, data, "test")
    content = report_content.run_content(model, data, metrics, run_dir, test=test, audit=audit)
    return report_html.write(content, run_dir / report_html.REPORT_HTML)
