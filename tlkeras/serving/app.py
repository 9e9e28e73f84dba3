"""TensorFlow Serving's REST API over exported tlkeras models: requests, answers, metrics.

Client code written against it works unchanged against ``tensorflow/serving``::

    POST /v1/models/NAME[/versions/N]:predict   {"instances": [...]} (row) or {"inputs": ...} (columnar),
                                                 binary values as {"b64": "..."}, optional "signature_name"
    GET  /v1/models/NAME[/versions/N]           version status (LOADING / AVAILABLE / END, load errors)
    GET  /v1/models/NAME[/versions/N]/metadata  signature defs
    GET  /monitoring/prometheus/metrics         Prometheus text (TF Serving's monitoring path)

Reading a request's body, and its limits, is ``tlkeras.serving.request``; the Prometheus metrics
are ``tlkeras.serving.metrics``. Which versions answer, and when new ones are loaded, is
``tlkeras.serving.servables``; batching of concurrent requests is ``tlkeras.serving.batching``; the
process (a production WSGI server, graceful shutdown) is ``tlkeras.serving.server``. Every bad
request gets ``{"error": "..."}`` with a 4xx status as TF Serving answers (400; 404 for an unknown
model or version; 503 when overloaded or timed out), never a 500 for anything a client can send.

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
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras import checks  # noqa: E402
from tlkeras.analysis.calibration import check_min_score, withhold_low_scores  # noqa: E402
from tlkeras.exports.loading import tf_error_message  # noqa: E402
from tlkeras.exports.signatures import BYTES_SIGNATURE  # noqa: E402
from tlkeras.serving.batching import BatchingConfig, QueueFullError  # noqa: E402
from tlkeras.serving.metrics import Metrics  # noqa: E402
from tlkeras.serving.request import (  # noqa: E402
    MAX_INSTANCES,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_PIXELS,
    REQUEST_TIMEOUT,
    RequestError,
    check_pixels,
    parse_body,
    parse_inputs,
    too_large_message,
)
from tlkeras.serving.servables import (  # noqa: E402
    DEFAULT_POLL_SECONDS,
    ModelManager,
    Servable,
    VersionPolicy,
    VersionState,
)

DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
METRICS_PATH = "/monitoring/prometheus/metrics"
_PATH_RE = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z]+))?$"
)


@dataclass(frozen=True)
class ServingConfig:
    """What a model server does with requests and versions; validated on creation."""

    # metadata: the options as scripts/serve.py shows them (tlkeras.cli.define_config_flags).
    model_version_policy: str = field(
        default="latest",
        metadata={"help": "Versions to serve: latest, latest:N, all, or specific:V1,V2."},
    )
    poll_seconds: float = field(
        default=DEFAULT_POLL_SECONDS,
        metadata={
            "help": "How often to look for new or removed versions.",
            "name": "file_system_poll_wait_seconds",  # TF Serving's name
        },
    )
    # None turns batching off: each request is one graph call.
    batching: BatchingConfig | None = field(default_factory=BatchingConfig)
    max_request_bytes: int = field(
        default=MAX_REQUEST_BYTES, metadata={"help": "Largest accepted request body."}
    )
    max_instances: int = field(
        default=MAX_INSTANCES, metadata={"help": "Most instances in one request."}
    )
    max_request_pixels: int = field(
        default=MAX_REQUEST_PIXELS,
        metadata={"help": "Most decoded pixels of all images of a request."},
    )
    request_timeout: float = field(
        default=REQUEST_TIMEOUT,
        metadata={"help": "Seconds a prediction may wait for the model: then 503."},
    )
    # Rows whose top score is below it answer "unknown" (the module docstring); 0: off.
    min_score: float = field(
        default=0.0,
        metadata={
            "help": 'Rows whose top score is below it answer classes "unknown" (scores kept); '
            'a request\'s own "min_score" overrides it. 0: off.'
        },
    )

    def __post_init__(self) -> None:
        VersionPolicy.parse(self.model_version_policy)
        check_min_score(self.min_score)
        for name in ("max_request_bytes", "max_instances", "max_request_pixels"):
            checks.positive_int(name, getattr(self, name))
        for name in ("poll_seconds", "request_timeout"):
            value = getattr(self, name)
            checks.number(name, value, low=0, low_open=True, kind="a number of seconds")
        if self.batching is not None and not isinstance(self.batching, BatchingConfig):
            raise ValueError(
                f"batching: expected a BatchingConfig or None, received {self.batching!r}"
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
        arrays, row_format = parse_inputs(body, specs, config.max_instances)
    except RecursionError:
        raise RequestError("request nested too deeply for the signature's inputs") from None
    check_pixels(arrays, config.max_request_pixels)
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
# The WSGI app (Flask).


def create_app(model_base_path: str | Path, model_name: str, config: ServingConfig | None = None):
    """A Flask app serving ``model_base_path`` under ``/v1/models/<model_name>``.

    The versions are loaded here (a model that cannot be served raises ``ValueError`` now) and then
    polled in the background; ``app.extensions["tlkeras_manager"].close()`` stops that.
    """
    from flask import Flask, Response, request

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
    _count_requests(app, metrics, model_name)
    _answer_errors(app, config.max_request_bytes)

    @app.route(METRICS_PATH, methods=["GET"])
    def prometheus_metrics():
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    @app.route("/v1/models/<path:rest>", methods=["GET", "POST"])
    def models(rest: str):
        return _reply(_answer_models(rest, request, manager, model_name, config))

    return app


def _reply(obj: Any, status: int = 200) -> Any:
    """``obj`` as a JSON response."""
    from flask import Response

    return Response(json.dumps(obj), status=status, mimetype="application/json")


def _endpoint(path: str) -> str:
    """The ``endpoint`` label of a request path in the metrics."""
    return (
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


def _count_requests(app: Any, metrics: Metrics, model_name: str) -> None:
    """Count each answer by endpoint and status code, and time it from the request received."""
    from flask import Response, g, request

    @app.before_request
    def _start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        endpoint = _endpoint(request.path)
        metrics.requests.labels(model_name, endpoint, str(response.status_code)).inc()
        if "started" in g:
            metrics.latency.labels(model_name, endpoint).observe(time.perf_counter() - g.started)
        return response


def _answer_errors(app: Any, max_request_bytes: int) -> None:
    """Every error as ``{"error": ...}``: a ``RequestError`` with its status, a body over
    ``max_request_bytes`` 413, other HTTP errors their own, anything else a 500 that says what."""
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    @app.errorhandler(RequestError)
    def _request_error(e: RequestError):
        return _reply({"error": str(e)}, e.status)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e):
        return _reply({"error": too_large_message(max_request_bytes)}, 413)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return _reply({"error": e.description or e.name}, e.code or 500)

    @app.errorhandler(Exception)
    def _internal(e: Exception):  # the server stays up, and says what went wrong
        app.logger.exception("internal error")
        return _reply({"error": f"internal error: {type(e).__name__}: {e}"}, 500)


def _servable(manager: ModelManager, version: int | None) -> Servable:
    try:
        return manager.get(version)
    except LookupError as e:
        raise RequestError(str(e), 404) from None


def _answer_models(
    rest: str, request: Any, manager: ModelManager, model_name: str, config: ServingConfig
) -> dict[str, Any]:
    """The answer to ``/v1/models/<rest>``: a prediction, the signature metadata or the version
    status; a ``RequestError`` (404 or 405 included) for anything else."""
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
        return predict(_servable(manager, version), body, config)
    if request.method != "GET":
        raise RequestError(f"Malformed request: POST /v1/models/{rest}", 405)
    if m["metadata"]:
        return signature_metadata(_servable(manager, version), model_name)
    states = manager.statuses()
    if version is not None:
        if version not in states:
            raise RequestError(
                f"Servable not found for request: Specific({model_name}, {version})", 404
            )
        states = {version: states[version]}
    return {"model_version_status": [version_status(v, s) for v, s in sorted(states.items())]}
