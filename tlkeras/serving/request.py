"""One predict request: its limits, and its JSON body read as TF Serving reads it.

``parse_body`` turns the request's bytes into JSON (malformed or hostile JSON is a 400);
``parse_inputs`` turns the body's ``"instances"`` (row format) or ``"inputs"`` (columnar format)
into one array per signature input, binary values as ``{"b64": "..."}``, dtypes and shapes checked
against the signature and anything a cast would silently change refused; ``check_pixels`` refuses
a request whose images declare too many pixels before any is decoded. Every refusal is a
``RequestError``, answered ``{"error": message}`` with its status (``tlkeras.serving.app``).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.data import declared_dimensions  # noqa: E402
from tlkeras.data.decoding import MAX_IMAGE_PIXELS  # noqa: E402

MAX_REQUEST_BYTES = 64 * 2**20
# Per-request limits: a request is refused (400) before any decoding beyond them.
MAX_INSTANCES = 1024
MAX_REQUEST_PIXELS = 200_000_000  # decoded RGB pixels of all images of one request (~600 MB)
REQUEST_TIMEOUT = 30.0


class RequestError(Exception):
    """A client error: answered with ``{"error": message}`` and ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------
# Request parsing (TF Serving's JSON conventions).


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _leaf_bytes(value: Any, name: str) -> bytes:
    if not _is_b64(value):
        kind = "a plain string" if isinstance(value, str) else type(value).__name__
        raise RequestError(
            f'input {name!r} is binary: expected each value as {{"b64": "<base64>"}}, received {kind}'
        )
    if not isinstance(value["b64"], str):
        raise RequestError(f'input {name!r}: expected "b64" to hold a string')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"input {name!r}: invalid base64 ({e})") from None


def _to_array(value: Any, spec: tf.TensorSpec, name: str) -> np.ndarray:
    """JSON value → numpy array of ``spec``'s dtype, shape checked against ``spec``."""
    if spec.dtype == tf.string:

        def convert(v):
            return [convert(x) for x in v] if isinstance(v, list) else _leaf_bytes(v, name)

        converted = convert(value)
        try:
            array = np.array(converted, dtype=object)
        except ValueError:
            array = None
        if array is None or (
            array.dtype == object and array.size and not isinstance(array.flat[0], bytes)
        ):
            raise RequestError(f"input {name!r}: expected a rectangular list of values")
    else:
        array = _numbers(value, spec.dtype, name)
    if not spec.shape.is_compatible_with(array.shape):
        raise RequestError(
            f"input {name!r}: expected shape {_shape_text(spec.shape)}, received "
            f"{list(array.shape)}"
        )
    return array


def _numbers(value: Any, dtype: tf.DType, name: str) -> np.ndarray:
    """JSON numbers → array of ``dtype``; refuses what a cast would silently change (NaN/Inf,
    fractions or out-of-range values for integer inputs, booleans for numbers)."""
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError):
        raise RequestError(
            f"input {name!r}: expected a rectangular list of numbers (ragged or too deeply nested "
            "lists received)"
        ) from None
    target = np.dtype(dtype.as_numpy_dtype)
    if raw.dtype.kind == "b" and target.kind == "b":
        return raw
    if raw.dtype.kind not in "iuf":
        kinds = {"str" if isinstance(v, str) else type(v).__name__ for v in raw.flat}
        if raw.dtype == object and any(_is_b64(v) for v in raw.flat):
            raise RequestError(
                f'input {name!r} has dtype {dtype.name}: {{"b64": ...}} is only for binary '
                "(string) inputs; send numbers"
            )
        if kinds <= {"int", "float"}:  # Python ints beyond 64 bits
            raise RequestError(f"input {name!r}: numbers out of range for {dtype.name}")
        raise RequestError(
            f"input {name!r} has dtype {dtype.name}: expected numbers, received "
            f"{', '.join(sorted(kinds - {'int', 'float'}))}"
        )
    if target.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            array = raw.astype(target)
        if not np.isfinite(array).all():
            raise RequestError(
                f"input {name!r}: expected finite numbers, received NaN, Infinity or a value out "
                f"of {dtype.name}'s range"
            )
        return array
    if target.kind in "iu":
        if raw.dtype.kind == "f":
            if not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
                raise RequestError(f"input {name!r} has dtype {dtype.name}: expected integers")
        info = np.iinfo(target)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise RequestError(
                f"input {name!r}: expected integers in [{info.min}, {info.max}] for {dtype.name}"
            )
    return raw.astype(target)


def _shape_text(shape: tf.TensorShape) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape.as_list()) + "]"


def parse_inputs(
    body: dict, specs: dict[str, tf.TensorSpec], max_instances: int = MAX_INSTANCES
) -> tuple[dict[str, np.ndarray], bool]:
    """Request body → named input arrays, and whether the request was row format."""
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise RequestError(
            'expected exactly one of "instances" (row format) or "inputs" (columnar format), '
            f"received {'both' if has_rows else 'neither'}"
        )
    names = sorted(specs)
    if has_rows:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise RequestError('"instances": expected a non-empty list')
        _check_count(len(rows), max_instances)
        named = [isinstance(r, dict) and not _is_b64(r) for r in rows]
        if any(named) and not all(named):
            raise RequestError('"instances": expected all rows as objects or none')
        if all(named):
            for r in rows:
                if set(r) != set(names):
                    raise RequestError(
                        f'"instances": expected every row to have inputs {names}, received {sorted(r)}'
                    )
            columns = {n: [r[n] for r in rows] for n in names}
        elif len(names) == 1:
            columns = {names[0]: rows}
        else:
            raise RequestError(
                f'"instances": this signature has inputs {names}; send rows as objects'
            )
    else:
        value = body["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            if set(value) != set(names):
                raise RequestError(f'"inputs": expected inputs {names}, received {sorted(value)}')
            columns = dict(value)
        elif len(names) == 1:
            columns = {names[0]: value}
        else:
            raise RequestError(f'"inputs": this signature has inputs {names}; send an object')
    for n in names:  # before converting anything: a huge list costs nothing more to refuse
        if isinstance(columns[n], list) and specs[n].shape.rank:
            _check_count(len(columns[n]), max_instances)
    arrays = {n: _to_array(columns[n], specs[n], n) for n in names}
    if has_rows and len({a.shape[0] for a in arrays.values()}) > 1:
        raise RequestError('"instances": all inputs must have the same number of rows')
    return arrays, has_rows


def _check_count(n: int, max_instances: int) -> None:
    if n > max_instances:
        raise RequestError(
            f"{n} instances in one request: expected at most {max_instances} (max_instances); "
            "split the request"
        )


def check_pixels(arrays: dict[str, np.ndarray], max_pixels: int) -> None:
    """Refuse a request whose images would decode to more than ``max_pixels`` in all, from their
    headers (the signature refuses single images declaring too much, and undecodable ones)."""
    total = 0
    for array in arrays.values():
        if array.dtype != object:
            continue
        for data in array.flat:
            size = declared_dimensions(data)
            if size and size[0] * size[1] > MAX_IMAGE_PIXELS:  # as the signature would say
                raise RequestError(f"image declares more than {MAX_IMAGE_PIXELS} pixels")
            if size:
                total += size[0] * size[1]
    if total > max_pixels:
        raise RequestError(
            f"the request's images declare {total} pixels in all: expected at most {max_pixels} "
            "(max_request_pixels); send fewer or smaller images"
        )


def too_large_message(max_request_bytes: int) -> str:
    return f"request body larger than the {max_request_bytes}-byte limit (max_request_bytes)"


def parse_body(raw: bytes) -> Any:
    """Request bytes → JSON value; malformed or hostile (deeply nested) JSON is a 400."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"JSON Parse error: {e}") from None
    except RecursionError:
        raise RequestError("JSON Parse error: nested too deeply") from None
