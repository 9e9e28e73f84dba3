"""TensorFlow Serving's REST API over exported tlkeras models: requests, answers, metrics.

Client code written against it works unchanged against ``tensorflow/serving``::

    POST /v1/models/NAME[/versions/N]:predict   {"instances": [...]} (row) or {"inputs": ...} (columnar),
                                                 binary values as {"b64": "..."}, optional "signature_name"
    GET  /v1/models/NAME[/versions/N]           version status (LOADING / AVAILABLE / END, load errors)
    GET  /v1/models/NAME[/versions/N]/metadata  signature defs
    GET  /monitoring/prometheus/metrics         Prometheus text (TF Serving's monitoring path)

Which versions answer, and when new ones are loaded, is ``tlkeras.serving.servables``; batching of concurrent
requests is ``tlkeras.serving.batching``; the process (a production WSGI server, graceful shutdown) is
``tlkeras.serving.server``. Every bad request gets ``{"error": "..."}`` with a 4xx status as TF Serving answers
(400; 404 for an unknown model or version; 503 when overloaded or timed out), never a 500 for
anything a client can send.

``min_score`` (a tlkeras extension): "unknown" rather than a guess. A predict request body may hold
a top-level ``"min_score"``, a number in [0, 1] (anything else is a 400); without one,
``ServingConfig.min_score`` applies (``scripts/serve.py --min_score``; 0, the default, is off). In
each row whose top score (``scores[0]``, the highest probability) is below it, every rank of
``classes`` becomes ``"unknown"``: the model's best guess is not good enough, and its runners-up
are worse. ``scores`` and ``probabilities`` stay as the model gave them, so a client still sees
how sure it was and what it would have said; rows at or above ``min_score`` are unchanged. The
response keeps TF Serving's format and shapes. It applies after the model call (batching is not
involved) to signatures with ``classes`` and ``scores`` outputs; a request's ``min_score`` on a
signature without them is a 400. A class really named "unknown" is indistinguishable: rename it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.analysis.calibration import check_min_score, withhold_low_scores  # noqa: E402
from tlkeras.data.sources import declared_dimensions  # noqa: E402
from tlkeras.exports.loading import tf_error_message  # noqa: E402
from tlkeras.exports.signatures import BYTES_SIGNATURE, MAX_IMAGE_PIXELS  # noqa: E402
from tlkeras.serving.batching import BatchingConfig, QueueFullError  # noqa: E402
from tlkeras.serving.servables import (  # noqa: E402
    DEFAULT_POLL_SECONDS,
    ModelManager,
    Servable,
    VersionPolicy,
    VersionState,
)

DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
MAX_REQUEST_BYTES = 64 * 2**20
# Per-request limits: a request is refused (400) before any decoding beyond them.
MAX_INSTANCES = 1024
MAX_REQUEST_PIXELS = 200_000_000  # decoded RGB pixels of all images of one request (~600 MB)
REQUEST_TIMEOUT = 30.0
METRICS_PATH = "/monitoring/prometheus/metrics"
_PATH_RE = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z]+))?$"
)


@dataclass(frozen=True)
class ServingConfig:
    """What a model server does with requests and versions; validated on creation."""

    model_version_policy: str = "latest"
    poll_seconds: float = DEFAULT_POLL_SECONDS
    # None turns batching off: each request is one graph call.
    batching: BatchingConfig | None = field(default_factory=BatchingConfig)
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_instances: int = MAX_INSTANCES
    max_request_pixels: int = MAX_REQUEST_PIXELS
    request_timeout: float = REQUEST_TIMEOUT
    # Rows whose top score is below it answer "unknown" (the module docstring); 0: off.
    min_score: float = 0.0

    def __post_init__(self) -> None:
        VersionPolicy.parse(self.model_version_policy)
        check_min_score(self.min_score)
        for name in ("max_request_bytes", "max_instances", "max_request_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, received {value!r}")
        for name in ("poll_seconds", "request_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a number of seconds > 0, received {value!r}")
        if self.batching is not None and not isinstance(self.batching, BatchingConfig):
            raise ValueError(
                f"batching: expected a BatchingConfig or None, received {self.batching!r}"
            )


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


def _parse_inputs(
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


def _check_pixels(arrays: dict[str, np.ndarray], max_pixels: int) -> None:
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


def _jsonable(array: np.ndarray, name: str) -> Any:
    if array.dtype == object:
        # TF Serving's convention: string outputs named *_bytes are base64, others are text.
        if name.endswith("_bytes"):
            return np.vectorize(lambda b: {"b64": base64.b64encode(b).decode()}, otypes=[object])(
                array
            ).tolist()
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array).tolist()
    return array.tolist()


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


def predict(servable: Servable, body: Any, config: ServingConfig | None = None) -> dict[str, Any]:
    """Run one TF-Serving-style predict request body on ``servable``; raises ``RequestError``."""
    config = config or ServingConfig()
    if not isinstance(body, dict):
        raise RequestError(f"expected a JSON object, received {type(body).__name__}")
    signature_name = body.get("signature_name", BYTES_SIGNATURE) or BYTES_SIGNATURE
    if not isinstance(signature_name, str) or signature_name not in servable.signatures:
        raise RequestError(
            f'Serving signature name: "{signature_name}" not found in signature def; expected one '
            f"of {sorted(servable.signatures)}"
        )
    min_score = _min_score(body, config)
    specs = servable.input_specs(signature_name)
    try:
        arrays, row_format = _parse_inputs(body, specs, config.max_instances)
    except RecursionError:
        raise RequestError("request nested too deeply for the signature's inputs") from None
    _check_pixels(arrays, config.max_request_pixels)
    try:
        outputs = servable.run(signature_name, arrays, timeout=config.request_timeout)
    except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
        raise RequestError(tf_error_message(e)) from None
    except (ValueError, TypeError) as e:  # signature binding: shapes/dtypes the graph refuses
        raise RequestError(" ".join(str(e).split())[:500]) from None
    except QueueFullError as e:
        raise RequestError(f"server overloaded: {e}; retry later", 503) from None
    except TimeoutError as e:
        raise RequestError(f"request timed out: {e} (request_timeout)", 503) from None
    if min_score > 0:
        if {"classes", "scores"} <= set(outputs):
            outputs = {
                **outputs,
                "classes": withhold_low_scores(outputs["classes"], outputs["scores"], min_score),
            }
        elif "min_score" in body:
            raise RequestError(
                f'"min_score": signature "{signature_name}" has no classes and scores outputs to '
                f"apply it to (outputs: {sorted(outputs)})"
            )
    if row_format:
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return {"predictions": _jsonable(value, name)}
        n = next(iter(outputs.values())).shape[0]
        columns = {k: _jsonable(v, k) for k, v in outputs.items()}
        return {"predictions": [{k: columns[k][i] for k in sorted(columns)} for i in range(n)]}
    if len(outputs) == 1:
        ((name, value),) = outputs.items()
        return {"outputs": _jsonable(value, name)}
    return {"outputs": {k: _jsonable(v, k) for k, v in sorted(outputs.items())}}


def _min_score(body: dict, config: ServingConfig) -> float:
    """The request's ``"min_score"`` (validated: a number in [0, 1]), else the server's."""
    if "min_score" not in body:
        return config.min_score
    try:
        return check_min_score(body["min_score"], '"min_score"')
    except ValueError as e:
        raise RequestError(str(e)) from None


def model_name_from_base_path(model_base_path: str | Path) -> str:
    """TF Serving's convention: the model is named after its base directory."""
    return Path(model_base_path).resolve().name


def version_status(version: int, state: VersionState) -> dict[str, Any]:
    """One entry of ``model_version_status`` as TF Serving renders it."""
    return {
        "version": str(version),
        "state": state.state,
        "status": {
            "error_code": "UNKNOWN" if state.error else "OK",
            "error_message": state.error,
        },
    }


def signature_metadata(servable: Servable, model_name: str) -> dict[str, Any]:
    """``GET .../metadata``: the SignatureDefs as TF Serving renders them (proto → JSON)."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString(
        (servable.model.path / "saved_model.pb").read_bytes()
    )
    defs = saved.meta_graphs[0].signature_def
    rendered = {
        name: json_format.MessageToDict(
            defs[name],
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
        for name in sorted(defs)
        if name in servable.signatures  # what clients may call
    }
    return {
        "model_spec": {"name": model_name, "signature_name": "", "version": str(servable.version)},
        "metadata": {"signature_def": {"signature_def": rendered}},
    }


# --------------------------------------------------------------------------------------------------
# Metrics.


class Metrics:
    """Prometheus metrics of one app, in its own registry (apps in one process stay apart)."""

    def __init__(self, model_name: str, max_batch_size: int = 1024) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.model = model_name
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tlkeras_serving_requests",
            "Requests answered, by endpoint and HTTP status code.",
            ["model", "endpoint", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tlkeras_serving_request_latency_seconds",
            "Time from request received to answer ready, by endpoint.",
            ["model", "endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        powers = [2**i for i in range(max(1, max_batch_size).bit_length() + 1)]
        self.batch_size = Histogram(
            "tlkeras_serving_batch_size",
            "Rows per model call (batching gathers concurrent requests into one call).",
            ["model", "version", "signature"],
            buckets=sorted(set(powers)),
            registry=self.registry,
        )

    def observe_batch(self, version: int, signature: str, rows: int) -> None:
        self.batch_size.labels(self.model, str(version), signature).observe(rows)

    def watch(self, manager: ModelManager) -> None:
        """Report ``manager``'s versions and their states at each scrape."""
        from prometheus_client.core import GaugeMetricFamily

        name = self.model

        class _Versions:
            def collect(self):
                family = GaugeMetricFamily(
                    "tlkeras_serving_model_version_state",
                    "1 for each version's current state (LOADING, AVAILABLE, END).",
                    labels=["model", "version", "state"],
                )
                for version, state in sorted(manager.statuses().items()):
                    family.add_metric([name, str(version), state.state], 1)
                yield family
                loaded = GaugeMetricFamily(
                    "tlkeras_serving_loaded_versions",
                    "Versions answering requests.",
                    labels=["model"],
                )
                loaded.add_metric([name], len(manager.available))
                yield loaded

        self.registry.register(_Versions())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------------
# The WSGI app (Flask).


def create_app(model_base_path: str | Path, model_name: str, config: ServingConfig | None = None):
    """A Flask app serving ``model_base_path`` under ``/v1/models/<model_name>``.

    The versions are loaded here (a model that cannot be served raises ``ValueError`` now) and then
    polled in the background; ``app.extensions["tlkeras_manager"].close()`` stops that.
    """
    from flask import Flask, Response, g, request
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    config = config or ServingConfig()
    metrics = Metrics(
        model_name, config.batching.max_batch_size if config.batching else config.max_instances
    )
    manager = ModelManager(
        model_base_path,
        model_name,
        policy=VersionPolicy.parse(config.model_version_policy),
        batching=config.batching,
        poll_seconds=config.poll_seconds,
        on_batch=metrics.observe_batch,
    )
    manager.start()
    metrics.watch(manager)
    app = Flask("tlkeras.serving.app")
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.extensions["tlkeras_manager"] = manager
    app.extensions["tlkeras_metrics"] = metrics

    def reply(obj: Any, status: int = 200) -> Response:
        return Response(json.dumps(obj), status=status, mimetype="application/json")

    def servable(version: int | None) -> Servable:
        try:
            return manager.get(version)
        except LookupError as e:
            raise RequestError(str(e), 404) from None

    @app.before_request
    def _start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        path = request.path
        endpoint = (
            "metrics"
            if path == METRICS_PATH
            else "predict"
            if path.endswith(":predict")
            else "metadata"
            if path.endswith("/metadata")
            else "status"
            if path.startswith("/v1/models/")
            else "other"
        )
        metrics.requests.labels(model_name, endpoint, str(response.status_code)).inc()
        if "started" in g:
            metrics.latency.labels(model_name, endpoint).observe(time.perf_counter() - g.started)
        return response

    @app.errorhandler(RequestError)
    def _request_error(e: RequestError):
        return reply({"error": str(e)}, e.status)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e):
        return reply({"error": too_large_message(config.max_request_bytes)}, 413)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return reply({"error": e.description or e.name}, e.code or 500)

    @app.errorhandler(Exception)
    def _internal(e: Exception):  # the server stays up, and says what went wrong
        app.logger.exception("internal error")
        return reply({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

    @app.route(METRICS_PATH, methods=["GET"])
    def prometheus_metrics():
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    @app.route("/v1/models/<path:rest>", methods=["GET", "POST"])
    def models(rest: str):
        m = _PATH_RE.match(rest)
        if not m:
            raise RequestError(f"Malformed request: {request.method} /v1/models/{rest}", 404)
        name, version = m["name"], int(m["version"]) if m["version"] else None
        if name != model_name:
            what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise RequestError(f"Servable not found for request: {what}", 404)
        if m["verb"]:
            if m["verb"] != "predict":
                raise RequestError(
                    f"Malformed request: only :predict is supported, received :{m['verb']}", 400
                )
            if request.method != "POST":
                raise RequestError("Malformed request: :predict expects POST", 405)
            body = parse_body(request.get_data(cache=False))
            return reply(predict(servable(version), body, config))
        if request.method != "GET":
            raise RequestError(f"Malformed request: POST /v1/models/{rest}", 405)
        if m["metadata"]:
            return reply(signature_metadata(servable(version), model_name))
        states = manager.statuses()
        if version is not None:
            if version not in states:
                raise RequestError(
                    f"Servable not found for request: Specific({model_name}, {version})", 404
                )
            states = {version: states[version]}
        return reply(
            {"model_version_status": [version_status(v, s) for v, s in sorted(states.items())]}
        )

    return app
