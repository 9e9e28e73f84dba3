"""A local server speaking TensorFlow Serving's REST API, for exported tlkeras models.

Client code written against it works unchanged against ``tensorflow/serving``::

    POST /v1/models/NAME[/versions/N]:predict   {"instances": [...]} (row) or {"inputs": ...} (columnar),
                                                 binary values as {"b64": "..."}, optional "signature_name"
    GET  /v1/models/NAME[/versions/N]           version status
    GET  /v1/models/NAME[/versions/N]/metadata  signature defs

The highest version under ``model_base_path`` answers by default; the directory is re-scanned on every
request (one ``scandir``), so a newly exported version is served without a restart. Every bad request
gets ``{"error": "..."}`` with HTTP 400 (404 for an unknown model or version), as TF Serving answers.
Built on Flask/Werkzeug; the model runs through ``tf.saved_model.load`` only.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.exported import ExportedModel, load_exported, tf_error_message  # noqa: E402
from tlkeras.signatures import BYTES_SIGNATURE  # noqa: E402

DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
MAX_REQUEST_BYTES = 64 * 2**20
_PATH_RE = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z]+))?$"
)
_VERSION_RE = re.compile(r"^[0-9]+$")
_INTERNAL_SIGNATURES = ("__saved_model_init_op",)


class RequestError(Exception):
    """A client error: answered with ``{"error": message}`` and ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------
# Versions on disk.


@dataclass
class _Loaded:
    stamp: float
    model: ExportedModel | None
    error: str | None = None


class ModelRepository:
    """The versions of one model under ``model_base_path``, loaded lazily and re-scanned on demand."""

    def __init__(self, model_base_path: str | Path, model_name: str) -> None:
        self.base = Path(model_base_path)
        self.name = model_name
        if not self.base.is_dir():
            raise FileNotFoundError(
                f"--model_base_path: expected a directory of numeric version folders, "
                f"received {str(self.base)!r}"
            )
        self._lock = threading.Lock()
        self._cache: dict[int, _Loaded] = {}

    def versions(self) -> list[int]:
        """Complete versions on disk (with ``saved_model.pb``), ascending."""
        try:
            entries = list(self.base.iterdir())
        except OSError:
            return []
        return sorted(
            int(p.name)
            for p in entries
            if _VERSION_RE.match(p.name) and (p / "saved_model.pb").is_file()
        )

    def _load(self, version: int) -> _Loaded:
        path = self.base / str(version)
        stamp = (path / "saved_model.pb").stat().st_mtime
        with self._lock:
            entry = self._cache.get(version)
            if entry is None or entry.stamp != stamp:
                try:
                    entry = _Loaded(stamp, load_exported(path))
                except (ValueError, OSError, tf.errors.OpError) as e:
                    entry = _Loaded(stamp, None, f"failed to load version {version}: {e}")
                self._cache[version] = entry
            # Forget versions that were removed from disk.
            for gone in set(self._cache) - set(self.versions()):
                del self._cache[gone]
        return entry

    def get(self, version: int | None = None) -> ExportedModel:
        """The model for ``version``, or the highest version that loads."""
        versions = self.versions()
        if version is not None:
            if version not in versions:
                raise RequestError(
                    f"Servable not found for request: Specific({self.name}, {version})", 404
                )
            entry = self._load(version)
            if entry.model is None:
                raise RequestError(entry.error or "failed to load", 500)
            return entry.model
        errors = []
        for v in reversed(versions):  # a broken newest version falls back to the previous one
            entry = self._load(v)
            if entry.model is not None:
                return entry.model
            errors.append(entry.error)
        if errors:
            raise RequestError("; ".join(e for e in errors if e), 500)
        raise RequestError(f"Servable not found for request: Latest({self.name})", 404)


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

        def check(v):
            if isinstance(v, list):
                for x in v:
                    check(x)
            elif _is_b64(v):
                raise RequestError(
                    f'input {name!r} has dtype {spec.dtype.name}: {{"b64": ...}} is only for '
                    "binary (string) inputs; send numbers"
                )
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(
                    f"input {name!r} has dtype {spec.dtype.name}: expected numbers, "
                    f"received {type(v).__name__}"
                )

        check(value)
        try:
            array = np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
        except ValueError:
            raise RequestError(
                f"input {name!r}: expected a rectangular list of numbers (ragged lists received)"
            ) from None
    if not spec.shape.is_compatible_with(array.shape):
        raise RequestError(
            f"input {name!r}: expected shape {_shape_text(spec.shape)}, received "
            f"{list(array.shape)}"
        )
    return array


def _shape_text(shape: tf.TensorShape) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape.as_list()) + "]"


def _parse_inputs(
    body: dict, specs: dict[str, tf.TensorSpec]
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
    arrays = {n: _to_array(columns[n], specs[n], n) for n in names}
    if has_rows and len({a.shape[0] for a in arrays.values()}) > 1:
        raise RequestError('"instances": all inputs must have the same number of rows')
    return arrays, has_rows


def _jsonable(array: np.ndarray, name: str) -> Any:
    if array.dtype == object:
        # TF Serving's convention: string outputs named *_bytes are base64, others are text.
        if name.endswith("_bytes"):
            return np.vectorize(lambda b: {"b64": base64.b64encode(b).decode()}, otypes=[object])(
                array
            ).tolist()
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array).tolist()
    return array.tolist()


def predict(model: ExportedModel, body: Any) -> dict[str, Any]:
    """Run one TF-Serving-style predict request body on ``model``; raises ``RequestError``."""
    if not isinstance(body, dict):
        raise RequestError(f"expected a JSON object, received {type(body).__name__}")
    signature_name = body.get("signature_name", BYTES_SIGNATURE) or BYTES_SIGNATURE
    signatures = model.signatures
    if not isinstance(signature_name, str) or signature_name not in signatures:
        raise RequestError(
            f'Serving signature name: "{signature_name}" not found in signature def; expected one '
            f"of {sorted(s for s in signatures if s not in _INTERNAL_SIGNATURES)}"
        )
    fn = signatures[signature_name]
    specs = fn.structured_input_signature[1]
    arrays, row_format = _parse_inputs(body, specs)
    try:
        outputs = fn(**{n: tf.constant(a, dtype=specs[n].dtype) for n, a in arrays.items()})
    except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
        raise RequestError(tf_error_message(e)) from None
    except (ValueError, TypeError) as e:  # signature binding: shapes/dtypes the graph refuses
        raise RequestError(" ".join(str(e).split())[:500]) from None
    outputs = {k: v.numpy() for k, v in outputs.items()}
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


def model_name_from_base_path(model_base_path: str | Path) -> str:
    """TF Serving's convention: the model is named after its base directory."""
    return Path(model_base_path).resolve().name


def version_status(version: int) -> dict[str, Any]:
    return {
        "version": str(version),
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }


def signature_metadata(model: ExportedModel, model_name: str) -> dict[str, Any]:
    """``GET .../metadata``: the SignatureDefs as TF Serving renders them (proto → JSON)."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((model.path / "saved_model.pb").read_bytes())
    defs = saved.meta_graphs[0].signature_def
    rendered = {
        name: json_format.MessageToDict(
            defs[name],
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
        for name in sorted(defs)
        if name not in _INTERNAL_SIGNATURES
    }
    return {
        "model_spec": {"name": model_name, "signature_name": "", "version": str(model.version)},
        "metadata": {"signature_def": {"signature_def": rendered}},
    }


# --------------------------------------------------------------------------------------------------
# The Flask app.


def create_app(
    model_base_path: str | Path,
    model_name: str,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
):
    """A Flask app serving ``model_base_path`` under ``/v1/models/<model_name>``."""
    from flask import Flask, Response, request
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ValueError(
            f"max_request_bytes: expected a positive int, received {max_request_bytes!r}"
        )
    repo = ModelRepository(model_base_path, model_name)
    app = Flask("tlkeras.serving")
    app.config["MAX_CONTENT_LENGTH"] = max_request_bytes
    app.extensions["tlkeras_repository"] = repo

    def reply(obj: Any, status: int = 200) -> Response:
        return Response(json.dumps(obj), status=status, mimetype="application/json")

    @app.errorhandler(RequestError)
    def _request_error(e: RequestError):
        return reply({"error": str(e)}, e.status)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e):
        # TF Serving answers malformed/oversized requests with 400 and a JSON error.
        return reply({"error": f"request body larger than the {max_request_bytes}-byte limit"}, 400)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return reply({"error": e.description or e.name}, e.code or 500)

    @app.errorhandler(Exception)
    def _internal(e: Exception):  # the server stays up, and says what went wrong
        app.logger.exception("internal error")
        return reply({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

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
            raw = request.get_data(cache=False)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"JSON Parse error: {e}") from None
            return reply(predict(repo.get(version), body))
        if request.method != "GET":
            raise RequestError(f"Malformed request: POST /v1/models/{rest}", 405)
        model = repo.get(version)
        if m["metadata"]:
            return reply(signature_metadata(model, model_name))
        return reply({"model_version_status": [version_status(model.version)]})

    return app


def make_server(
    model_base_path: str | Path,
    model_name: str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_request_bytes: int = MAX_REQUEST_BYTES,
):
    """A threaded Werkzeug server for ``create_app``; call ``serve_forever()`` / ``shutdown()``.

    The default version is loaded first, so a bad model path fails here rather than on a request.
    """
    from werkzeug.serving import make_server as _make_server

    app = create_app(model_base_path, model_name, max_request_bytes=max_request_bytes)
    try:
        app.extensions["tlkeras_repository"].get()
    except RequestError as e:
        raise ValueError(f"--model_base_path: {e}") from None
    return _make_server(host, port, app, threaded=True)
