"""report.html: ranking, rendering of every section, and the page in a real headless browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tlkeras.workflows import report_content, report_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium and sets this: there the browser test must run, not skip.
REQUIRE_BROWSER = os.environ.get("TLKERAS_REQUIRE_BROWSER") == "1"


class Page(HTMLParser):
    """Section ids, their text, and the images (``src``) of a rendered page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []
        self._current: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._current = attrs["id"]
            self.sections[self._current] = ""
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "section":
            self._current = None

    def handle_data(self, data):
        if self._current:
            self.sections[self._current] += data


def test_top_losses_rank_the_most_wrong_first():
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.99, 0.01], [0.4, 0.6]])
    assert report_content.top_losses(y, p, "multiclass", 2).tolist() == [2, 3]
    multi_y = np.array([[1, 0], [1, 1]])
    multi_p = np.array([[0.9, 0.1], [0.1, 0.2]])
    assert report_content.top_losses(multi_y, multi_p, "multilabel", 1).tolist() == [1]
    assert np.all(
        np.isfinite(report_content.per_example_loss(y, np.eye(2)[[1, 0, 0, 1]], "binary"))
    )


def test_most_confused_lists_off_diagonal_pairs_by_count():
    pairs = report_content.most_confused([[5, 2, 0], [7, 3, 1], [0, 0, 9]], ["a", "b", "c"])
    assert pairs == [("b", "a", 7), ("a", "b", 2), ("b", "c", 1)]


def _content(task: str, rng: np.random.Generator) -> report_content.ReportContent:
    names = ["ants", "bees", "wasps"] if task != "binary" else ["ants", "bees"]
    n = 12
    if task == "multilabel":
        y = (rng.random((n, len(names))) > 0.5).astype(int)
        p = rng.random((n, len(names)))
        confusion = [[[3, 1], [2, 6]] for _ in names]
    else:
        y = rng.integers(0, len(names), n)
        p = rng.dirichlet(np.ones(len(names)), n)
        confusion = np.eye(len(names), dtype=int).tolist()
        confusion[0][1] = 3
    images = rng.integers(0, 255, (4, 40, 30, 3), dtype=np.uint8)
    idx = report_content.top_losses(y, p, task, 4)
    gallery = report_content.gallery_items(
        idx, y, p, task, names, [f"f{i}.jpg" for i in range(n)], images, images
    )
    metrics = {
        "accuracy": 0.5,
        "num_examples": n,
        "class_names": names,
        "per_class": {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 4} for c in names},
        "confusion_matrix": confusion,
        "data": {
            "source": "photos",
            "skipped": [{"path": "ants/empty.jpg", "reason": "empty file"}],
            "notes": [{"path": "bees/x.jpg", "reason": "a GIF named .jpg: first frame used"}],
        },
        "phases": [
            {
                "phase": 1,
                "name": "head",
                "epochs_run": 2,
                "trainable_params": 10,
                "wall_time_s": 1.0,
            }
        ],
        "run": {"backbone": "MobileNet", "strategy": "full", "fine_tune_at": 0},
    }
    return report_content.ReportContent(
        title=f"{task} run",
        metrics=metrics,
        task=task,
        history_png=report_content.png_bytes(images[0]),
        gallery=gallery,
        calibration={"temperature": 1.7, "ece_before": 0.12, "ece_after": 0.03},
        reliability_png=report_content.png_bytes(images[1]),
        tta={"views": "flip", "accuracy": 0.5, "accuracy_with_tta": 0.55},
        audit={
            "summary": "1 leak",
            "leaks": [
                {
                    "similarity": 0.99,
                    "a": {"split": "train", "item": "f1.jpg", "label": "ants"},
                    "b": {"split": "test", "item": "f2.jpg", "label": "ants"},
                }
            ],
            "leak_count": 1,
            "duplicates": [],
            "mislabels": [
                {
                    "split": "train",
                    "item": "f3.jpg",
                    "label": "ants",
                    "predicted": "bees",
                    "confidence": 0.97,
                }
            ],
        },
    )


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_every_section_renders(task):
    page = Page(report_html.render(_content(task, np.random.default_rng(0))))
    assert list(page.sections) == [sid for sid, _ in report_html.SECTIONS]
    assert "f1.jpg" in page.sections["audit"] and "f2.jpg" in page.sections["audit"]
    assert "f3.jpg" in page.sections["audit"] and "0.970" in page.sections["audit"]
    assert "ants/empty.jpg" in page.sections["skipped"] and "GIF" in page.sections["skipped"]
    assert "1.7" in page.sections["calibration"]
    assert page.sections["top-losses"].count("loss ") == 4
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    # history, 4 thumbnails + 4 overlays, reliability
    assert len(page.images) == 10
    if task != "multilabel":
        assert "ants" in page.sections["most-confused"] and "3" in page.sections["most-confused"]


def test_empty_sections_say_why():
    content = report_content.ReportContent(
        title="t", metrics={}, notes={"top-losses": "No test split: nothing held out."}
    )
    page = Page(report_html.render(content))
    assert "No test split" in page.sections["top-losses"]
    assert page.sections["audit"].strip() == "Data auditNot run."


def open_in_browser(path: Path, screenshot: Path | None = None) -> tuple[str, str]:
    """The DOM after load, and Chromium's log (console messages land there)."""
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
    ]
    args += (
        [f"--screenshot={screenshot}", "--window-size=1200,2400"] if screenshot else ["--dump-dom"]
    )
    done = subprocess.run(
        [*args, path.resolve().as_uri()], capture_output=True, text=True, timeout=120
    )
    return done.stdout, done.stderr


@pytest.mark.skipif(CHROMIUM is None and not REQUIRE_BROWSER, reason="no chromium on this machine")
def test_page_loads_in_a_real_browser_and_its_images_decode(tmp_path):
    assert CHROMIUM, "TLKERAS_REQUIRE_BROWSER=1 but no chromium on PATH"
    path = report_html.write(_content("multiclass", np.random.default_rng(1)), tmp_path / "r.html")
    dom, log = open_in_browser(path)
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert 'data-images="10"' in body[0] and 'data-broken="0"' in body[0], body[0]
    assert "CONSOLE" not in log, log  # no script error, no failed load
