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


def test_optional_accepts_none_and_says_so():
    assert checks.integer("cpu_replicas", None, 1, optional=True) is None
    assert checks.positive_int("version", None, optional=True) is None
    assert checks.number("probe_c", None, low=0, optional=True) is None
    with pytest.raises(ValueError, match=r"^version: expected a positive int or None, received 0$"):
        checks.positive_int("version", 0, optional=True)
    with pytest.raises(ValueError, match=r"^n: expected an int >= 1 or None, received True$"):
        checks.integer("n", True, 1, optional=True)


def test_number_kind_names_what_is_counted():
    with pytest.raises(
        ValueError, match=r"^timeout: expected a number of seconds > 0, received 0$"
    ):
        checks.number("timeout", 0, low=0, low_open=True, kind="a number of seconds")


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"low_open": True}, 0, r"expected a number in \(0, 1\], received 0$"),
        ({"high_open": True}, 1.0, r"expected a number in \[0, 1\), received 1.0$"),
        (
            {"note": " (0 = off)"},
            "high",
            r"expected a number in \[0, 1\] \(0 = off\), received 'high'$",
        ),
        ({}, math.nan, r"expected a number in \[0, 1\], received nan$"),
        ({"kind": "a fraction"}, True, r"expected a fraction in \[0, 1\], received True$"),
    ],
)
def test_interval_is_written_as_one(kwargs, value, message):
    with pytest.raises(ValueError, match=f"^x: {message}"):
        checks.interval("x", value, 0, 1, **kwargs)


def test_interval_accepts_its_ends_when_closed():
    assert checks.interval("x", 0, 0, 1) == 0
    assert checks.interval("x", 1.0, 0, 1) == 1.0
    assert checks.interval("x", np.float32(0.5), 0.5, 1, high_open=True) == np.float32(0.5)


def test_boolean():
    assert checks.boolean("fast", False) is False
    with pytest.raises(ValueError, match=r"^fast: expected a bool, received 1$"):
        checks.boolean("fast", 1)
    with pytest.raises(TypeError, match=r"^fast: expected a bool, received 'yes'$"):
        checks.boolean("fast", "yes", wrong_type=TypeError)


def test_choice_as_repr_and_of_ints():
    with pytest.raises(ValueError, match=r"^task: expected one of \('a', 'b'\), received 'c'$"):
        checks.choice("task", "c", ("a", "b"), as_repr=True)
    with pytest.raises(ValueError, match=r"^split: expected one of \['a', 'b'\], received 1$"):
        checks.choice("split", 1, ["a", "b"], as_repr=True)
    assert checks.choice("crops", np.int64(5), (0, 5)) == 5
    for bad in (True, 5.0, "5"):
        with pytest.raises(ValueError, match=r"^crops: expected one of 0, 5, received "):
            checks.choice("crops", bad, (0, 5))


def test_a_received_value_is_shown_short_and_as_python_writes_it():
    with pytest.raises(ValueError, match=r"received 0$"):
        checks.positive_int("steps", np.int64(0))
    with pytest.raises(ValueError, match=r"received '(x){56}\.\.\.$"):
        checks.choice("mode", "x" * 100, ("a",))
    assert checks.shown(np.float64(0.5)) == "0.5"


def test_instance_names_the_type_received():
    assert checks.instance("config", {"a": 1}, dict, "a dict") == {"a": 1}
    assert checks.instance("augment", None, dict, "a dict", optional=True) is None
    with pytest.raises(TypeError, match=r"^config: expected a TrainConfig, received str$"):
        checks.instance("config", "x", dict, "a TrainConfig")
    with pytest.raises(TypeError, match=r"^augment: expected a dict or None, received int$"):
        checks.instance("augment", 3, dict, "a dict", optional=True)
