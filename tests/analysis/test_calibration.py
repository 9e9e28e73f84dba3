"""tlkeras.analysis.calibration: ECE, reliability curves, temperature scaling, withholding low scores."""

from __future__ import annotations

import numpy as np
import pytest

from tlkeras.analysis import calibration

SHARPEN = 0.3  # the over-confident model's temperature: true logits / 0.3


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def calibrated_sample(n: int = 4000, classes: int = 5, seed: int = 0):
    """True probabilities and labels drawn from them: a perfectly calibrated model's outputs."""
    rng = np.random.default_rng(seed)
    p = softmax(rng.normal(0, 1.5, (n, classes)))
    y = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)  # one categorical draw per row
    return y, p


def test_temperature_scaling_fixes_an_over_confident_model_and_keeps_its_predictions():
    y, true = calibrated_sample()
    over = softmax(np.log(true) / SHARPEN)  # the same ranking, sharpened: over-confident
    assert calibration.expected_calibration_error(y, true) < 0.03  # calibrated: near 0
    ece_over = calibration.expected_calibration_error(y, over)
    assert ece_over > 0.15

    t = calibration.fit_temperature(y, over, "multiclass")
    assert 0.8 / SHARPEN < t < 1.2 / SHARPEN  # recovers the sharpening (1 / 0.3 = 3.3)
    fixed = calibration.apply_temperature(over, t, "multiclass")
    np.testing.assert_array_equal(np.argmax(fixed, axis=1), np.argmax(over, axis=1))
    np.testing.assert_allclose(fixed.sum(axis=1), 1.0, atol=1e-9)
    assert calibration.expected_calibration_error(y, fixed) < 0.03

    record = calibration.calibrate(y, over, "multiclass")
    assert record.temperature == pytest.approx(t, rel=1e-6) and record.split == "validation"
    assert record.ece_after < record.ece_before == pytest.approx(ece_over)
    assert record.nll_after < record.nll_before
    assert record.to_dict()["n_bins"] == calibration.DEFAULT_BINS
    # Measured on another split with the validation temperature.
    y2, true2 = calibrated_sample(seed=1)
    test = calibration.evaluate_temperature(y2, softmax(np.log(true2) / SHARPEN), t, "multiclass")
    assert test.split == "test" and test.ece_after < test.ece_before


@pytest.mark.parametrize("shape", ["column", "flat", "two_columns"])
def test_binary_and_multilabel_heads(shape):
    rng = np.random.default_rng(2)
    p = 1 / (1 + np.exp(-rng.normal(0, 2, 3000)))
    y = (rng.random(3000) < p).astype(int)
    over = calibration.apply_temperature(p, SHARPEN, "binary")  # sigmoid(logit(p) / 0.3)
    given = {"column": over[:, None], "flat": over, "two_columns": np.stack([1 - over, over], 1)}
    t = calibration.fit_temperature(y, given[shape], "binary")
    assert 0.8 / SHARPEN < t < 1.2 / SHARPEN
    fixed = calibration.apply_temperature(given[shape], t, "binary")
    assert fixed.shape == given[shape].shape
    two = fixed if shape == "two_columns" else np.stack([1 - fixed.ravel(), fixed.ravel()], 1)
    assert calibration.expected_calibration_error(y, two) < calibration.expected_calibration_error(
        y, given["two_columns"]
    )

    labels = (rng.random((1000, 3)) < p[:3000].reshape(1000, 3)).astype(int)
    multi = calibration.apply_temperature(p.reshape(1000, 3), SHARPEN, "multilabel")
    t = calibration.fit_temperature(labels, multi, "multilabel")
    assert 0.7 / SHARPEN < t < 1.3 / SHARPEN
    fixed = calibration.apply_temperature(multi, t, "multilabel")
    np.testing.assert_array_equal(fixed >= 0.5, multi >= 0.5)
    before = calibration.expected_calibration_error(labels, multi, task="multilabel")
    assert calibration.expected_calibration_error(labels, fixed, task="multilabel") < before


def test_reliability_curve_and_diagram(tmp_path):
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.95, 0.05], [0.45, 0.55], [0.3, 0.7], [0.3, 0.7]])
    curve = calibration.reliability_curve(y, p, n_bins=10)
    assert sum(curve.count) == 4 and len(curve.edges) == 11
    assert curve.count[9] == 1 and curve.accuracy[9] == 1.0  # (0.9, 1]: 0.95, right
    assert curve.count[6] == 2 and curve.accuracy[6] == 0.5  # (0.6, 0.7]: one of two right
    assert curve.confidence[6] == pytest.approx(0.7) and np.isnan(curve.accuracy[0])
    # ECE = sum of |accuracy - confidence| weighted by count: (0.05 + 0.45 + 2 * 0.2) / 4
    assert curve.ece == pytest.approx((0.05 + 0.45 + 2 * 0.2) / 4)
    assert curve.to_dict()["accuracy"][0] is None
    after = calibration.reliability_curve(y, calibration.apply_temperature(p, 2.0, "multiclass"))
    out = calibration.plot_reliability(curve, after, tmp_path / "reliability.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_withhold_low_scores():
    classes = np.array([[b"ants", b"bees"], [b"bees", b"ants"]], dtype=object)
    scores = np.array([[0.9, 0.1], [0.55, 0.45]])
    out = calibration.withhold_low_scores(classes, scores, 0.6)
    assert out.tolist() == [[b"ants", b"bees"], [b"unknown", b"unknown"]]
    assert classes[1, 0] == b"bees"  # a copy
    assert calibration.withhold_low_scores([["a"]], [[0.1]], 0).tolist() == [["a"]]
    assert calibration.withhold_low_scores([["a"]], [[0.1]], 0.5).tolist() == [["unknown"]]


BAD = {
    "task": (lambda: calibration.fit_temperature([0], [[1.0, 0.0]], "regression"), "task"),
    "shape": (lambda: calibration.fit_temperature([0, 1], [0.2, 0.8], "multiclass"), "[N, C]"),
    "empty": (lambda: calibration.expected_calibration_error([], np.zeros((0, 3))), "N ≥ 1"),
    "nan": (lambda: calibration.fit_temperature([0], [[np.nan, 1.0]], "multiclass"), "finite"),
    "range": (lambda: calibration.expected_calibration_error([0], [[1.5, -0.5]]), "[0, 1]"),
    "not_softmax": (
        lambda: calibration.fit_temperature([0, 1], [[0.5, 0.9], [0.1, 0.9]], "multiclass"),
        "summing to 1",
    ),
    "label_count": (lambda: calibration.fit_temperature([0], np.eye(2), "multiclass"), "2 int"),
    "label_range": (
        lambda: calibration.expected_calibration_error([0, 3], np.eye(2)),
        "labels in [0, 1]",
    ),
    "multilabel_labels": (
        lambda: calibration.fit_temperature([0, 1], np.full((2, 3), 0.5), "multilabel"),
        "multi-hot",
    ),
    "bins": (lambda: calibration.reliability_curve([0], [[1.0, 0.0]], n_bins=0), "n_bins"),
    "temperature": (
        lambda: calibration.apply_temperature([[0.5, 0.5]], 0.0, "multiclass"),
        "temperature",
    ),
    "temperature_type": (
        lambda: calibration.apply_temperature([[0.5, 0.5]], "2", "multiclass"),
        "temperature",
    ),
    "min_score": (lambda: calibration.withhold_low_scores([["a"]], [[0.5]], 1.5), "min_score"),
    # Every prediction right: the likelihood has no minimum inside the bounds.
    "all_right": (
        lambda: calibration.fit_temperature([0, 1], [[0.9, 0.1], [0.2, 0.8]], "multiclass"),
        "both right and wrong",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_value_errors_saying_expected_and_received(case):
    call, match = BAD[case]
    with pytest.raises(ValueError, match="expected") as info:
        call()
    assert match in str(info.value) and "received" in str(info.value)
