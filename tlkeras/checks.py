"""Argument checks shared by every layer: one wording for every "expected …, received …" message.

Config dataclasses call these in ``__post_init__`` and functions call them on entry, so a bad value
fails where it is given, with the name the user wrote (``TrainConfig.epochs``, ``--top_k``) and what
was expected. Each check returns the value it accepted. Booleans are never numbers here
(``True`` is an int to Python, never a sensible epoch count).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def integer(
    name: str,
    value: Any,
    minimum: int | None = None,
    *,
    wrong_type: type[Exception] = ValueError,
) -> int:
    """An int (NumPy ints too) ``>= minimum``: "``name``: expected an int >= 1, received 0"."""
    if not _is_int(value):
        expected = (
            "an int" if minimum is None or wrong_type is TypeError else f"an int >= {minimum}"
        )
        raise wrong_type(f"{name}: expected {expected}, received {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, received {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    """An int >= 1: "``name``: expected a positive int, received 0"."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, received {value!r}")
    return value


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = True,
    finite: bool = False,
    wrong_type: type[Exception] = ValueError,
) -> float:
    """A real number within the bounds: "``name``: expected a number > 0, received -1"
    ("a finite number" with ``finite``, which also refuses NaN and infinities)."""
    kind = "a finite number" if finite else "a number"
    bounds = _bounds(low, high, low_open, high_open)
    expected = f"{kind} {bounds}".strip()
    if not _is_number(value):
        raise wrong_type(
            f"{name}: expected {'a number' if wrong_type is TypeError else expected}, received {value!r}"
        )
    v = float(value)
    bad = (finite and not math.isfinite(v)) or math.isnan(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        raise ValueError(f"{name}: expected {expected}, received {value!r}")
    return value


def fraction(name: str, value: Any, *, upper_inclusive: bool = False) -> float:
    """A number in [0, 1) (or [0, 1]): "``name``: expected a number in [0, 1), received 1.0"."""
    ok = _is_number(value) and (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0)
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name}: expected a number in {bound}, received {value!r}")
    return value


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of ``choices``: "``name``: expected one of a, b, received 'c'"."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, received {value!r}")
    return value
