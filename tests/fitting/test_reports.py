"""Tests for tlkeras.fitting.reports: metrics, history files, plots, summary."""

import csv
import json

import numpy as np
import pytest

from tlkeras.fitting import reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_classification_metrics_multiclass_matches_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 50)
    y_prob = rng.random((50, 3))
    y_prob /= y_prob.sum(1, keepdims=True)
    m = reports.classification_metrics(y_true, y_prob, ["a", "b", "c"])
    pred = y_prob.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, pred))
    assert m["confusion_matrix"] == confusion_matrix(y_true, pred, labels=[0, 1, 2]).tolist()
    f1 = f1_score(y_true, pred, average=None, labels=[0, 1, 2])
    assert [m["per_class"][c]["f1"] for c in "abc"] == pytest.approx(f1)
    assert sum(m["per_class"][c]["support"] for c in "abc") == 50
    assert m["class_names"] == ["a", "b", "c"]
    json.dumps(m, allow_nan=False)  # JSON-ready


@pytest.mark.parametrize("shape", [(4, 1), (4,)])
def test_classification_metrics_binary_one_sigmoid_unit(shape):
    p = np.array([0.1, 0.9, 0.6, 0.4]).reshape(shape)
    m = reports.classification_metrics([0, 1, 0, 0], p, ["ants", "bees"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[2, 1], [0, 1]]


def test_classification_metrics_class_absent_from_test_is_listed():
    m = reports.classification_metrics([0, 0], np.array([[0.9, 0.1, 0], [0.8, 0.2, 0]]), "xyz")
    assert m["per_class"]["z"]["support"] == 0
    assert len(m["confusion_matrix"]) == 3


@pytest.mark.parametrize(
    "y_true, y_prob, names, match",
    [
        ([0, 1], np.zeros((2, 3)), ["a", "b"], "columns"),
        ([0, 1, 1], np.zeros((2, 2)), ["a", "b"], "as many labels"),
        ([0], np.zeros((1, 1)), ["a"], "at least 2"),
    ],
)
def test_classification_metrics_rejects_bad_input(y_true, y_prob, names, match):
    with pytest.raises(ValueError, match=match):
        reports.classification_metrics(y_true, y_prob, names)


def test_multilabel_metrics():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    m = reports.multilabel_metrics(y, np.array([[0.9, 0.1, 0.7], [0.2, 0.3, 0.1]]), "abc")
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["recall"] == 0.0
    assert np.asarray(m["confusion_matrix"]).shape == (3, 2, 2)


def test_write_history_json_and_csv(tmp_path):
    history = {
        "epoch": [0, 1, 2],
        "phase": [1, 1, 2],
        "loss": [1.0, 0.5, float("nan")],
        "val_loss": [1.1, 0.6, 0.4],
    }
    json_path, csv_path = reports.write_history(history, tmp_path, phase_boundary=2)
    loaded = json.loads(json_path.read_text())
    assert loaded["phase_boundary"] == 2
    assert loaded["history"]["loss"] == [1.0, 0.5, None]  # strict JSON: NaN -> null
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["phase"] for r in rows] == ["1", "1", "2"]
    assert float(rows[1]["val_loss"]) == 0.6


def test_write_history_rejects_ragged_columns(tmp_path):
    with pytest.raises(ValueError, match="equal length"):
        reports.write_history({"loss": [1.0], "val_loss": [1.0, 2.0]}, tmp_path, None)


@pytest.mark.parametrize("boundary", [None, 2])
def test_plots_are_png_files(tmp_path, boundary):
    history = {"epoch": [0, 1, 2, 3], "loss": [4, 3, 2, 1], "val_loss": [4, 3, 3, 2]}
    history |= {"accuracy": [0.1, 0.2, 0.3, 0.4], "val_accuracy": [0.1, 0.1, 0.2, 0.3]}
    h = reports.plot_history(history, tmp_path / "h.png", boundary)
    c = reports.plot_confusion([[3, 1], [0, 4]], ["a", "b"], tmp_path / "c.png")
    for path in (h, c):
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 2000


def test_summary_text_names_accuracy_classes_skipped_and_export():
    metrics = reports.classification_metrics([0, 1], np.eye(2), ["ants", "bees"])
    metrics |= {
        "evaluated_on": "test",
        "skipped": [{"path": "x.jpg", "reason": "zero-byte file"}],
        "phases": [
            {
                "phase": 1,
                "name": "head warm-up",
                "epochs_run": 2,
                "trainable_params": 1234,
                "wall_time_s": 1.5,
                "fast_path": "cached",
            }
        ],
        "export": "saved_models/x/1",
    }
    text = reports.summary_text(metrics)
    assert "Test accuracy: 1.0000 on 2 images" in text
    assert "bees" in text and "zero-byte file" in text and "saved_models/x/1" in text
    assert "1,234" in text
    assert len(text.splitlines()) < 25
