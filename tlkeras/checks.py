"""Argument checks shared by every layer: one wording for every "expected …, received …" message.

Config dataclasses call these in ``__post_init__`` and functions call them on entry, so a bad value
fails where it is given, with the name the user wrote (``TrainConfig.epochs``, ``--top_k``) and what
was expected. Each check returns the value it accepted. Booleans are never numbers here
(``True`` is an int to Python, never a sensible epoch count). ``optional=True`` also accepts
``None`` (the message then says "or None"). A received value is shown as ``repr`` (a NumPy scalar
as its Python value), cut to ``SHOWN_LIMIT`` characters: values can come from a request body.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

SHOWN_LIMIT = 60


def is_int(value: Any) -> bool:
    """An int, NumPy's too, and not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number, NumPy's too, and not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """How a message shows a received value: its ``repr`` (``np.int64(3)`` as ``3``), cut short."""
    if is_number(value) and type(value) not in (int, float) and hasattr(value, "item"):
        value = value.item()
    text = repr(value)
    return text if len(text) <= SHOWN_LIMIT else f"{text[: SHOWN_LIMIT - 3]}..."


def _refuse(error: type[Exception], name: str, expected: str, value: Any, optional: bool):
    suffix = " or None" if optional else ""
    return error(f"{name}: expected {expected}{suffix}, received {shown(value)}")


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
    optional: bool = False,
    wrong_type: type[Exception] = ValueError,
) -> int | None:
    """An int (NumPy ints too) ``>= minimum``: "``name``: expected an int >= 1, received 0"."""
    if optional and value is None:
        return None
    expected = "an int" if minimum is None else f"an int >= {minimum}"
    if not is_int(value):
        wanted = "an int" if wrong_type is TypeError else expected
        raise _refuse(wrong_type, name, wanted, value, optional)
    if minimum is not None and value < minimum:
        raise _refuse(ValueError, name, expected, value, optional)
    return value


def positive_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """An int >= 1: "``name``: expected a positive int, received 0"."""
    if optional and value is None:
        return None
    if not is_int(value) or value < 1:
        raise _refuse(ValueError, name, "a positive int", value, optional)
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
    kind: str | None = None,
    optional: bool = False,
    wrong_type: type[Exception] = ValueError,
) -> float | None:
    """A real number within the bounds: "``name``: expected a number > 0, received -1"
    ("a finite number" with ``finite``, which also refuses NaN and infinities; ``kind`` replaces
    "a number", as in "a number of seconds > 0")."""
    if optional and value is None:
        return None
    kind = kind or ("a finite number" if finite else "a number")
    expected = f"{kind} {_bounds(low, high, low_open, high_open)}".strip()
    if not is_number(value):
        wanted = "a number" if wrong_type is TypeError else expected
        raise _refuse(wrong_type, name, wanted, value, optional)
    v = float(value)
    bad = (finite and not math.isfinite(v)) or math.isnan(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        raise _refuse(ValueError, name, expected, value, optional)
    return value


def interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    kind: str = "a number",
    note: str = "",
) -> float:
    """A number in an interval written as one: "``name``: expected a number in (0, 1], received 0"
    (``note`` follows the interval, as in "[0, 1] (0 = off)"; NaN is never inside)."""
    ok = is_number(value) and (
        (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise _refuse(ValueError, name, f"{kind} in {span}{note}", value, False)
    return value


def fraction(
    name: str, value: Any, *, upper_inclusive: bool = False, kind: str = "a number"
) -> float:
    """A number in [0, 1) (or [0, 1]): "``name``: expected a number in [0, 1), received 1.0"."""
    return interval(name, value, 0, 1, high_open=not upper_inclusive, kind=kind)


def boolean(name: str, value: Any, *, wrong_type: type[Exception] = ValueError) -> bool:
    """``True`` or ``False`` (not 0 or 1): "``name``: expected a bool, received 'yes'"."""
    if not isinstance(value, bool):
        raise _refuse(wrong_type, name, "a bool", value, False)
    return value


def instance(
    name: str, value: Any, types: type | tuple[type, ...], what: str, *, optional: bool = False
) -> Any:
    """An instance of ``types`` (``what`` names it): a ``TypeError`` "``name``: expected a
    TrainConfig, received str" otherwise (the type received, not the value)."""
    if (optional and value is None) or isinstance(value, types):
        return value
    suffix = " or None" if optional else ""
    raise TypeError(f"{name}: expected {what}{suffix}, received {type(value).__name__}")


def _same_kind(value: Any, wanted: Any) -> bool:
    if is_int(wanted):
        return is_int(value)
    return isinstance(value, type(wanted)) and isinstance(value, bool) == isinstance(wanted, bool)


def choice(name: str, value: Any, choices: Iterable[Any], *, as_repr: bool = False) -> Any:
    """One of ``choices``: "``name``: expected one of a, b, received 'c'" (``as_repr``: the
    choices as Python writes the collection given, "expected one of ('a', 'b')"). A bool is
    never one of several ints."""
    listed = repr(choices) if as_repr else None
    choices = tuple(choices)
    ok = any(_same_kind(value, c) and value == c for c in choices)
    if not ok:
        listed = listed or ", ".join(str(c) for c in choices)
        raise _refuse(ValueError, name, f"one of {listed}", value, False)
    return value
