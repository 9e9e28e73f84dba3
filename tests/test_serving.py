"""tlkeras.serving: TF Serving's REST API over exported models (Flask test client + one real socket)."""

from __future__ import annotations

import base64
import http.client
import json
import threading

import badfiles
import keras
import numpy as np
import pytest

from tlkeras import exported, savedmodel, serving

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
    return serving.create_app(base, "tiny", max_request_bytes=2**20).test_client()


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
        400,
        "limit",
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


# --------------------------------------------------------------------------------------------------
# Versions.


def test_new_version_is_served_without_restart_and_broken_ones_fall_back(tmp_path):
    savedmodel.export(tiny_model(), "tiny", base_dir=tmp_path, class_names=NAMES, verify=False)
    base = tmp_path / "tiny"
    client = serving.create_app(base, "tiny").test_client()
    assert client.get("/v1/models/tiny").json["model_version_status"][0]["version"] == "1"
    savedmodel.export(
        tiny_model(seed=7), "tiny", base_dir=tmp_path, class_names=NAMES, verify=False
    )
    assert client.get("/v1/models/tiny").json["model_version_status"][0]["version"] == "2"
    r = client.post("/v1/models/tiny:predict", json={"instances": [b64(JPEGS[0])]})
    np.testing.assert_allclose(
        r.json["predictions"][0]["probabilities"],
        expected_probabilities(base, JPEGS[:1], 2)[0],
        atol=1e-6,
    )
    r1 = client.post("/v1/models/tiny/versions/1:predict", json={"instances": [b64(JPEGS[0])]})
    assert r1.json["predictions"][0]["probabilities"] != r.json["predictions"][0]["probabilities"]
    # A corrupt newest version (not written by export) does not take the model down.
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes(b"garbage")
    assert client.get("/v1/models/tiny").json["model_version_status"][0]["version"] == "2"
    r3 = client.post("/v1/models/tiny/versions/3:predict", json={"instances": [b64(JPEGS[0])]})
    assert r3.status_code == 500 and "failed to load version 3" in r3.json["error"]


def test_missing_base_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_base_path"):
        serving.create_app(tmp_path / "missing", "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Servable not found"):
        serving.make_server(tmp_path / "empty", "m", port=0)


# --------------------------------------------------------------------------------------------------
# One real HTTP server on a loopback port.


def test_real_http_requests_on_loopback(base):
    server = serving.make_server(base, "tiny", host="127.0.0.1", port=0, max_request_bytes=2**20)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:

        def call(method, url, body=None):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=60)
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
        status, out_big = call("POST", "/v1/models/tiny:predict", b"x" * 2**21)
        assert status == 400 and "limit" in out_big["error"]
        status, again = call("POST", "/v1/models/tiny:predict", {"instances": [b64(JPEGS[0])]})
        assert status == 200
        assert again["predictions"][0]["classes"] == out["predictions"][0]["classes"]
        assert call("GET", "/v1/models/tiny")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
