"""tlkeras.checks: every check's accepted values and its one message shape."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tlkeras import checks


@pytest.mark.parametrize("value", [1, 7, np.int64(3)])
def test_integer_accepts_ints_at_or_above_the_minimum(value):
    assert checks.integer("epochs", value, 1) == value


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "epochs: expected an int >= 1, received 0"),
        (True, ValueError, "epochs: expected an int >= 1, received True"),
        (1.5, ValueError, "epochs: expected an int >= 1, received 1.5"),
    ],
)
def test_integer_refuses_with_what_was_expected(value, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        checks.integer("epochs", value, 1)


def test_integer_can_refuse_a_wrong_type_as_a_type_error():
    with pytest.raises(TypeError, match=r"^TrainConfig.epochs: expected an int, received '3'$"):
        checks.integer("TrainConfig.epochs", "3", 0, wrong_type=TypeError)
    with pytest.raises(ValueError, match=r"expected an int >= 0, received -1$"):
        checks.integer("TrainConfig.epochs", -1, 0, wrong_type=TypeError)


def test_positive_int():
    assert checks.positive_int("steps", 2) == 2
    for bad in (0, -3, 2.0, False, None):
        with pytest.raises(ValueError, match=r"^steps: expected a positive int, received "):
            checks.positive_int("steps", bad)


@pytest.mark.parametrize(
    ("kwargs", "value", "expected"),
    [
        ({"low": 0, "low_open": True}, 0, "a number > 0"),
        ({"low": 0, "high": 1}, 1, "a number >= 0 and < 1"),
        ({"low": 0, "high": 1, "high_open": False}, 1.5, "a number >= 0 and <= 1"),
        ({"low": 0, "finite": True}, math.inf, "a finite number >= 0"),
        ({"low": 0}, math.nan, "a number >= 0"),
        ({"low": 0}, "x", "a number >= 0"),
        ({"low": 0}, True, "a number >= 0"),
    ],
)
def test_number_says_the_bounds_it_wanted(kwargs, value, expected):
    with pytest.raises(ValueError, match=f"^lr: expected {expected}, received "):
        checks.number("lr", value, **kwargs)


def test_number_accepts_values_inside_the_bounds():
    assert checks.number("lr", 0.5, low=0, high=1) == 0.5
    assert checks.number("lr", np.float32(2), low=0, low_open=True) == np.float32(2)
    assert checks.number("lr", 1, low=0, high=1, high_open=False) == 1
    with pytest.raises(TypeError, match=r"^lr: expected a number, received None$"):
        checks.number("lr", None, low=0, wrong_type=TypeError)


def test_fraction_and_choice():
    assert checks.fraction("split", 0.0) == 0.0
    assert checks.fraction("split", 1.0, upper_inclusive=True) == 1.0
    with pytest.raises(ValueError, match=r"^split: expected a number in \[0, 1\), received 1.0$"):
        checks.fraction("split", 1.0)
    assert checks.choice("--format", "onnx", ("tflite", "onnx")) == "onnx"
    with pytest.raises(ValueError, match=r"^--format: expected one of tflite, onnx, received 'x'$"):
        checks.choice("--format", "x", ("tflite", "onnx"))
