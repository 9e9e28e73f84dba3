"""tlkeras.serving.app: TF Serving's REST API over exported models (Flask test client + one real socket)."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import threading

import badfiles
import keras
import numpy as np
import pytest

from tlkeras.exports import loading as exported
from tlkeras.exports import savedmodel
from tlkeras.serving import app as serving
from tlkeras.serving import server

NAMES = ["ants", "bees", "wasps"]


def tiny_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A model base path with version 1 (the module's tests may add versions)."""
    root = tmp_path_factory.mktemp("saved_models")
    savedmodel.export(tiny_model(), "tiny", base_dir=root, class_names=NAMES, verify=False, top_k=2)
    return root / "tiny"


@pytest.fixture(scope="module")
def client(base):
    app = serving.create_app(base, "tiny", serving.ServingConfig(max_request_bytes=2**20))
    yield app.test_client()
    app.extensions["tlkeras_manager"].close()


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


JPEGS = [
    badfiles.encode(badfiles.picture((40, 50), badfiles.COLOURS[i], seed=i), "JPEG")
    for i in range(3)
]


def expected_probabilities(base, images=JPEGS, version=None):
    return exported.load_exported(base, version).predict_bytes(images)["probabilities"]


# --------------------------------------------------------------------------------------------------
# Good requests.


def test_row_format_b64_predict(client, base):
    r = client.post("/v1/models/tiny:predict", json={"instances": [b64(b) for b in JPEGS]})
    assert r.status_code == 200, r.json
    rows = r.json["predictions"]
    assert len(rows) == 3 and set(rows[0]) == {"probabilities", "classes", "scores"}
    np.testing.assert_allclose(
        [row["probabilities"] for row in rows], expected_probabilities(base), atol=1e-6
    )
    for row in rows:
        assert len(row["classes"]) == 2 and all(c in NAMES for c in row["classes"])
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert row["classes"][0] == NAMES[int(np.argmax(row["probabilities"]))]


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [b64(b) for b in JPEGS]},
        {"inputs": {"image_bytes": [b64(b) for b in JPEGS]}},
        {"instances": [{"image_bytes": b64(b)} for b in JPEGS]},
        {"signature_name": "serving_default", "inputs": [b64(b) for b in JPEGS]},
    ],
    ids=["columnar", "columnar_named", "rows_named", "signature_named"],
)
def test_every_request_layout_gives_the_same_answer(client, base, body):
    r = client.post("/v1/models/tiny/versions/1:predict", json=body)
    assert r.status_code == 200, r.json
    out = r.json.get("outputs") or {
        k: [row[k] for row in r.json["predictions"]] for k in ("probabilities", "classes")
    }
    np.testing.assert_allclose(out["probabilities"], expected_probabilities(base), atol=1e-6)
    assert len(out["classes"]) == 3


def test_float_signature(client, base):
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    r = client.post(
        "/v1/models/tiny:predict",
        json={"signature_name": "serving_float", "instances": pixels.tolist()},
    )
    assert r.status_code == 200, r.json
    want = exported.load_exported(base).predict_pixels(pixels)["probabilities"]
    np.testing.assert_allclose([p["probabilities"] for p in r.json["predictions"]], want, atol=1e-5)


def test_status_and_metadata(client):
    r = client.get("/v1/models/tiny")
    assert r.status_code == 200
    (status,) = r.json["model_version_status"]
    assert status["state"] == "AVAILABLE" and status["status"]["error_code"] == "OK"
    r = client.get("/v1/models/tiny/versions/1/metadata")
    assert r.status_code == 200
    assert r.json["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    defs = r.json["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == {"serving_default", "serving_float"}
    image_bytes = defs["serving_default"]["inputs"]["image_bytes"]
    assert image_bytes["dtype"] == "DT_STRING"
    assert image_bytes["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    dims = defs["serving_float"]["inputs"]["images"]["tensor_shape"]["dim"]
    assert [d["size"] for d in dims] == ["-1", "32", "32", "3"]
    assert set(defs["serving_float"]["outputs"]) == {"probabilities", "classes", "scores"}
    assert defs["serving_default"]["method_name"] == "tensorflow/serving/predict"


# --------------------------------------------------------------------------------------------------
# Bad requests: a 400 (404 for unknown model/version) with {"error": ...}, and the server stays up.

PIXELS = np.zeros((1, 32, 32, 3)).tolist()
BAD = {
    "malformed_json": ("POST", "/v1/models/tiny:predict", b"{not json", 400, "JSON Parse error"),
    "not_an_object": ("POST", "/v1/models/tiny:predict", [1, 2], 400, "JSON object"),
    "missing_b64_wrapper": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [base64.b64encode(JPEGS[0]).decode()]},
        400,
        '{"b64"',
    ),
    "invalid_base64": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [{"b64": "@@@"}]},
        400,
        "base64",
    ),
    "b64_to_float_signature": (
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "serving_float", "instances": [b64(JPEGS[0])]},
        400,
        "only for binary",
    ),
    "both_instances_and_inputs": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [b64(JPEGS[0])], "inputs": [b64(JPEGS[0])]},
        400,
        "both",
    ),
    "neither": (
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "serving_default"},
        400,
        "neither",
    ),
    "empty_instances": ("POST", "/v1/models/tiny:predict", {"instances": []}, 400, "non-empty"),
    "wrong_shape": (
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "serving_float", "instances": np.zeros((1, 31, 32, 3)).tolist()},
        400,
        "expected shape [-1, 32, 32, 3]",
    ),
    "ragged": (
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "serving_float", "instances": [PIXELS[0], PIXELS[0][:-1]]},
        400,
        "",
    ),
    "strings_to_float": (
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "serving_float", "instances": [["a"]]},
        400,
        "expected numbers",
    ),
    "undecodable_image": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [b64(b"<html>not an image</html>")]},
        400,
        "Unknown image file format",
    ),
    "truncated_jpeg": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [b64(JPEGS[0][:200])]},
        400,
        "",
    ),
    "decompression_bomb": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [b64(badfiles.png_bomb())]},
        400,
        "declares more than",
    ),
    "empty_image": ("POST", "/v1/models/tiny:predict", {"instances": [b64(b"")]}, 400, "empty"),
    "oversized_body": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [b64(b"x" * 2**20)]},
        413,
        "max_request_bytes",
    ),
    "unknown_signature": (
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "nope", "instances": [b64(JPEGS[0])]},
        400,
        "not found in signature def",
    ),
    "wrong_named_input": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [{"pixels": b64(JPEGS[0])}]},
        400,
        "image_bytes",
    ),
    "unknown_model": (
        "POST",
        "/v1/models/other:predict",
        {"instances": [b64(JPEGS[0])]},
        404,
        "other",
    ),
    "unknown_version": ("GET", "/v1/models/tiny/versions/99", None, 404, "99"),
    "unknown_verb": ("POST", "/v1/models/tiny:classify", {"instances": []}, 400, ":predict"),
    "unknown_path": ("GET", "/v2/whatever", None, 404, ""),
    # Hostile bodies: 4xx, never a 500.
    "deeply_nested_json": ("POST", "/v1/models/tiny:predict", b"[" * 50_000, 400, "nested"),
    "deeply_nested_instances": (
        "POST",
        "/v1/models/tiny:predict",
        b'{"instances": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
        400,
        "nested",
    ),
    "nan_pixels": (
        "POST",
        "/v1/models/tiny:predict",
        b'{"signature_name": "serving_float", "instances": '
        + json.dumps(PIXELS).replace("0.0", "NaN", 1).encode()
        + b"}",
        400,
        "finite",
    ),
    "infinite_pixels": (
        "POST",
        "/v1/models/tiny:predict",
        b'{"signature_name": "serving_float", "inputs": '
        + json.dumps(PIXELS).replace("0.0", "1e999", 1).encode()
        + b"}",
        400,
        "finite",
    ),
    "float32_overflow": (
        "POST",
        "/v1/models/tiny:predict",
        b'{"signature_name": "serving_float", "inputs": '
        + json.dumps(PIXELS).replace("0.0", "1e300", 1).encode()
        + b"}",
        400,
        "range",
    ),
    "bools_to_float": (
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "serving_float", "instances": np.ones((1, 32, 32, 3), bool).tolist()},
        400,
        "received bool",
    ),
    "too_many_instances": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [{"b64": "AA=="}] * (serving.MAX_INSTANCES + 1)},
        400,
        "max_instances",
    ),
    "too_many_columnar_inputs": (
        "POST",
        "/v1/models/tiny:predict",
        {"inputs": {"image_bytes": [{"b64": "AA=="}] * (serving.MAX_INSTANCES + 1)}},
        400,
        "max_instances",
    ),
    "huge_integer": (
        "POST",
        "/v1/models/tiny:predict",
        {"signature_name": "serving_float", "instances": [[[[10**40] * 3] * 32] * 32]},
        400,
        "out of range",
    ),
    "min_score_string": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [b64(JPEGS[0])], "min_score": "high"},
        400,
        "\"min_score\": expected a number in [0, 1] (0 = off), received 'high'",
    ),
    "min_score_out_of_range": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [b64(JPEGS[0])], "min_score": 1.5},
        400,
        "received 1.5",
    ),
    "min_score_bool": (
        "POST",
        "/v1/models/tiny:predict",
        {"instances": [b64(JPEGS[0])], "min_score": True},
        400,
        "received True",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_json_errors_and_the_server_stays_up(client, case):
    method, url, body, status, match = BAD[case]
    if isinstance(body, bytes):
        r = client.open(url, method=method, data=body, content_type="application/json")
    elif body is None:
        r = client.open(url, method=method)
    else:
        r = client.open(url, method=method, json=body)
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.is_json and set(r.json) == {"error"} and match in r.json["error"]
    assert "node" not in r.json["error"] and "Traceback" not in r.json["error"]
    ok = client.post("/v1/models/tiny:predict", json={"instances": [b64(JPEGS[0])]})
    assert ok.status_code == 200


def test_min_score_answers_unknown_below_it_and_keeps_the_scores(client, base):
    probabilities = expected_probabilities(base)
    tops = probabilities.max(axis=1)
    assert tops.max() - tops.min() > 1e-4  # one row surer than another
    threshold = float((tops.min() + tops.max()) / 2)
    body = {"instances": [b64(b) for b in JPEGS], "min_score": threshold}
    r = client.post("/v1/models/tiny:predict", json=body)  # through the batcher
    assert r.status_code == 200, r.json
    plain = client.post("/v1/models/tiny:predict", json={"instances": body["instances"]}).json
    for row, before, top in zip(r.json["predictions"], plain["predictions"], tops, strict=True):
        assert row["scores"] == before["scores"]
        assert row["probabilities"] == before["probabilities"]
        if top < threshold:
            assert row["classes"] == ["unknown", "unknown"]
        else:
            assert row["classes"] == before["classes"] and row["classes"][0] in NAMES
    # Columnar, on the float signature, and 0 (off) for this request.
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).tolist()
    r = client.post(
        "/v1/models/tiny:predict",
        json={"signature_name": "serving_float", "inputs": pixels, "min_score": 1},
    )
    assert r.status_code == 200 and r.json["outputs"]["classes"] == [["unknown"] * 2] * 2
    r = client.post(
        "/v1/models/tiny:predict", json={"instances": body["instances"], "min_score": 0}
    )
    assert r.json == plain
    # The server's default (scripts/serve.py --min_score); a request's own value overrides it.
    servable = client.application.extensions["tlkeras_manager"].get(None)
    strict = serving.ServingConfig(min_score=1.0, batching=None)
    out = serving.predict(servable, {"instances": body["instances"]}, strict)
    assert all(row["classes"] == ["unknown", "unknown"] for row in out["predictions"])
    out = serving.predict(servable, {"instances": body["instances"], "min_score": 0}, strict)
    assert out == plain
    with pytest.raises(ValueError, match="min_score: expected a number in"):
        serving.ServingConfig(min_score=2)


def test_request_pixel_limit(base):
    # Each test JPEG is 40x50 = 2,000 pixels: two fit under 5,000, three do not.
    app = serving.create_app(base, "tiny", serving.ServingConfig(max_request_pixels=5_000))
    try:
        client = app.test_client()
        ok = client.post("/v1/models/tiny:predict", json={"instances": [b64(b) for b in JPEGS[:2]]})
        assert ok.status_code == 200
        r = client.post("/v1/models/tiny:predict", json={"instances": [b64(b) for b in JPEGS]})
        assert r.status_code == 400 and "6000 pixels" in r.json["error"]
        assert "max_request_pixels" in r.json["error"]
    finally:
        app.extensions["tlkeras_manager"].close()


def test_metrics_endpoint_parses_as_prometheus_text(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/models/tiny:predict", json={"instances": [b64(JPEGS[0])]})
    client.post("/v1/models/tiny:predict", data=b"{", content_type="application/json")
    r = client.get(serving.METRICS_PATH)
    assert r.status_code == 200 and r.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}
    requests = {
        (s.labels["endpoint"], s.labels["code"]): s.value
        for s in families["tlkeras_serving_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("predict", "200")] >= 1 and requests[("predict", "400")] >= 1
    latency = families["tlkeras_serving_request_latency_seconds"]
    assert latency.type == "histogram"
    assert any(s.name.endswith("_count") and s.value >= 2 for s in latency.samples)
    batches = families["tlkeras_serving_batch_size"]
    assert any(s.name.endswith("_count") and s.value >= 1 for s in batches.samples)
    (state,) = families["tlkeras_serving_model_version_state"].samples
    assert state.labels == {"model": "tiny", "version": "1", "state": "AVAILABLE"}
    assert families["tlkeras_serving_loaded_versions"].samples[0].value == 1


# --------------------------------------------------------------------------------------------------
# Versions.


def poll_app(base, **config):
    """An app whose background poll never runs during the test (the test polls)."""
    return serving.create_app(base, "tiny", serving.ServingConfig(poll_seconds=3600, **config))


def export(tmp_path, seed=0):
    savedmodel.export(tiny_model(seed), "tiny", base_dir=tmp_path, class_names=NAMES, verify=False)


def test_new_version_is_served_without_restart_and_broken_ones_do_not_replace_it(tmp_path):
    export(tmp_path)
    base = tmp_path / "tiny"
    app = poll_app(base)
    manager, client = app.extensions["tlkeras_manager"], app.test_client()
    try:
        assert client.get("/v1/models/tiny").json["model_version_status"][0]["version"] == "1"
        # The warmup records written by export were replayed before version 1 was published.
        assert manager.statuses()[1].warmup_records == 3
        export(tmp_path, seed=7)
        assert client.get("/v1/models/tiny").json["model_version_status"][0]["version"] == "1"
        manager.poll()  # what the background thread does every poll_seconds
        states = {
            s["version"]: s for s in client.get("/v1/models/tiny").json["model_version_status"]
        }
        assert states["2"]["state"] == "AVAILABLE"
        # 1 is unloaded (policy: latest) and reported so, as TF Serving does.
        assert states["1"]["state"] == "END" and states["1"]["status"]["error_code"] == "OK"
        r = client.post("/v1/models/tiny:predict", json={"instances": [b64(JPEGS[0])]})
        np.testing.assert_allclose(
            r.json["predictions"][0]["probabilities"],
            expected_probabilities(base, JPEGS[:1], 2)[0],
            atol=1e-6,
        )
        gone = client.post(
            "/v1/models/tiny/versions/1:predict", json={"instances": [b64(JPEGS[0])]}
        )
        assert gone.status_code == 404 and "Specific(tiny, 1)" in gone.json["error"]
        # A corrupt newest version (not written by export) is reported and does not replace 2.
        (base / "3").mkdir()
        (base / "3" / "saved_model.pb").write_bytes(b"garbage")
        manager.poll()
        states = {
            s["version"]: s for s in client.get("/v1/models/tiny").json["model_version_status"]
        }
        assert states["2"]["state"] == "AVAILABLE"
        assert states["3"]["state"] == "END" and states["3"]["status"]["error_code"] == "UNKNOWN"
        assert "failed to load version 3" in states["3"]["status"]["error_message"]
        ok = client.post("/v1/models/tiny:predict", json={"instances": [b64(JPEGS[0])]})
        assert ok.status_code == 200 and ok.json == r.json
        r3 = client.post("/v1/models/tiny/versions/3:predict", json={"instances": [b64(JPEGS[0])]})
        assert r3.status_code == 404 and "failed to load version 3" in r3.json["error"]
        # Removing the served version unloads it; the newest left on disk is loaded again.
        shutil.rmtree(base / "3")
        shutil.rmtree(base / "2")
        manager.poll()
        assert manager.available == [1]
        shutil.rmtree(base / "1")
        manager.poll()
        assert manager.available == [] and client.get("/v1/models/tiny").json == {
            "model_version_status": []
        }
        assert client.post("/v1/models/tiny:predict", json={"instances": []}).status_code == 404
    finally:
        manager.close()


@pytest.mark.parametrize(
    "policy, served",
    [("latest", [3]), ("latest:2", [2, 3]), ("all", [1, 2, 3]), ("specific:1,3", [1, 3])],
)
def test_version_policies(tmp_path, policy, served):
    for seed in range(3):
        export(tmp_path, seed)
    app = poll_app(tmp_path / "tiny", model_version_policy=policy)
    try:
        manager = app.extensions["tlkeras_manager"]
        assert manager.available == served
        client = app.test_client()
        for v in (1, 2, 3):
            r = client.post(
                f"/v1/models/tiny/versions/{v}:predict", json={"instances": [b64(JPEGS[0])]}
            )
            assert r.status_code == (200 if v in served else 404)
    finally:
        app.extensions["tlkeras_manager"].close()


def test_missing_base_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_base_path"):
        serving.create_app(tmp_path / "missing", "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no servable version"):
        server.make_server(tmp_path / "empty", "m", server=server.ServerConfig(port=0))
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="failed to load version 1"):
        serving.create_app(tmp_path / "broken", "m")


# --------------------------------------------------------------------------------------------------
# One real HTTP server on a loopback port.


def test_real_http_requests_on_loopback(base):
    running = server.make_server(
        base,
        "tiny",
        serving.ServingConfig(max_request_bytes=2**20),
        server.ServerConfig(host="127.0.0.1", port=0),
    )
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    try:

        def call(method, url, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", running.server_port, timeout=60)
            try:
                data = (
                    body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
                )
                conn.request(method, url, body=data, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                return response.status, json.loads(response.read())
            finally:
                conn.close()

        status, out = call(
            "POST", "/v1/models/tiny:predict", {"instances": [b64(b) for b in JPEGS]}
        )
        assert status == 200 and len(out["predictions"]) == 3
        assert call("POST", "/v1/models/tiny:predict", b"{oops")[0] == 400
        assert call("POST", "/v1/models/tiny:predict", {"instances": [b64(b"GIF89a")]})[0] == 400
        assert call("GET", "/v1/models/nope")[0] == 404
        # A body over the limit is refused from its Content-Length, before it is sent.
        with socket.create_connection(("127.0.0.1", running.server_port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: %d\r\n\r\n" % 2**21
            )
            reply = sock.makefile("rb").read()
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head
        assert "max_request_bytes" in json.loads(payload)["error"]
        status, again = call("POST", "/v1/models/tiny:predict", {"instances": [b64(JPEGS[0])]})
        assert status == 200
        assert again["predictions"][0]["classes"] == out["predictions"][0]["classes"]
        assert call("GET", "/v1/models/tiny")[0] == 200
    finally:
        running.shutdown(timeout=30)
        thread.join(timeout=10)
    assert not thread.is_alive()
