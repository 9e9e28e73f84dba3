"""tlkeras.serving.server and scripts/serve.py: the serving process — batching over real sockets, version
swaps under load, graceful shutdown on SIGTERM, bad flags."""

from __future__ import annotations

import base64
import gc
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
from conftest import REPO, check_bad_flags_fail_in_one_line
from test_serving import JPEGS, NAMES, expected_probabilities, tiny_model

from tlkeras.exports import savedmodel
from tlkeras.serving import app as serving
from tlkeras.serving import batching, server

SCRIPT = REPO / "scripts" / "serve.py"


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def post(port: int, body, url: str = "/v1/models/tiny:predict", timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", url, body=json.dumps(body).encode())
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture
def running(tmp_path, request):
    """A server on a free loopback port over version 1 of the tiny model; ``request.param``:
    ServingConfig fields."""
    savedmodel.export(tiny_model(), "tiny", base_dir=tmp_path, class_names=NAMES, verify=False)
    config = serving.ServingConfig(**getattr(request, "param", {}))
    s = server.make_server(tmp_path / "tiny", "tiny", config, server.ServerConfig(port=0))
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.shutdown(timeout=30)
    thread.join(timeout=10)


SLOW_BATCH = {
    "batching": batching.BatchingConfig(max_batch_size=16, batch_timeout_micros=1_000_000)
}


@pytest.mark.parametrize("running", [SLOW_BATCH], indirect=True)
def test_concurrent_requests_are_batched_and_one_bad_image_fails_alone(running):
    truncated = JPEGS[0][:200]
    requests = [JPEGS[:1], JPEGS[:2], [truncated], JPEGS, JPEGS[1:2]]
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def send(i):
        start.wait()
        results[i] = post(running.server_port, {"instances": [b64(b) for b in requests[i]]})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    base = running.app.extensions["tlkeras_manager"].base
    for images, (status, out) in zip(requests, results, strict=True):
        if images[0] is truncated:
            assert status == 400 and set(out) == {"error"}
            continue
        assert status == 200, out
        np.testing.assert_allclose(
            [row["probabilities"] for row in out["predictions"]],
            expected_probabilities(base, images),
            atol=1e-5,
        )
    # The batch-size histogram saw the gathered batch (1+2+1+3+1 = 8 rows in one call).
    metrics = running.app.extensions["tlkeras_metrics"].render().decode()
    counts = dict(
        re.findall(
            r'tlkeras_serving_batch_size_bucket\{.*?le="([0-9.+Inf]+)".*?\} ([0-9.]+)', metrics
        )
    )
    assert float(counts["4.0"]) < float(counts["8.0"])


@pytest.mark.parametrize("running", [{"poll_seconds": 0.2}], indirect=True)
def test_a_new_version_is_swapped_in_under_load_without_failed_requests(running, tmp_path):
    stop = threading.Event()
    answers: list = []

    def load():
        while not stop.is_set():
            sent = time.monotonic()
            status, out = post(running.server_port, {"instances": [b64(JPEGS[0])]})
            answers.append(
                (
                    status,
                    out["predictions"][0]["probabilities"] if status == 200 else out,
                    sent,
                    time.monotonic(),
                )
            )

    clients = [threading.Thread(target=load) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        time.sleep(0.5)
        savedmodel.export(
            tiny_model(seed=7), "tiny", base_dir=tmp_path, class_names=NAMES, verify=False
        )
        manager = running.app.extensions["tlkeras_manager"]
        deadline = time.monotonic() + 60
        while manager.available != [2] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert manager.available == [2]
    assert all(a[0] == 200 for a in answers), [a for a in answers if a[0] != 200][:3]
    old, new = (expected_probabilities(tmp_path / "tiny", JPEGS[:1], v)[0] for v in (1, 2))
    matches = [
        "old"
        if np.allclose(p, old, atol=1e-5)
        else "new"
        if np.allclose(p, new, atol=1e-5)
        else "?"
        for _, p, _, _ in answers
    ]
    assert "?" not in matches and matches[0] == "old" and matches[-1] == "new"
    # Atomic: a request sent after any client got an answer from the new version never gets the
    # old one (requests sent before may still finish in the old version's queue).
    first_new = min(a[3] for a, m in zip(answers, matches, strict=True) if m == "new")
    late_old = [
        a[2] for a, m in zip(answers, matches, strict=True) if m == "old" and a[2] > first_new
    ]
    assert not late_old, (first_new, late_old[:3])


@pytest.mark.parametrize("running", [SLOW_BATCH], indirect=True)
def test_shutdown_lets_the_request_in_flight_finish_and_refuses_new_ones(running):
    result = []
    t = threading.Thread(
        target=lambda: result.append(post(running.server_port, {"instances": [b64(JPEGS[0])]}))
    )
    t.start()
    deadline = time.monotonic() + 10
    while running.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.in_flight == 1  # waiting out the 1 s batch timeout
    running.request_shutdown()
    time.sleep(0.2)
    with pytest.raises(OSError):
        post(running.server_port, {"instances": [b64(JPEGS[0])]}, timeout=5)
    t.join(30)
    assert result and result[0][0] == 200


def test_sigterm_ends_the_script_after_in_flight_requests(tmp_path):
    savedmodel.export(tiny_model(), "tiny", base_dir=tmp_path, class_names=NAMES, verify=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            f"--model_base_path={tmp_path / 'tiny'}",
            "--port=0",
            "--batch_timeout_micros=2000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:([0-9]+)/v1/models/tiny ", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(m[1])
        result = []
        t = threading.Thread(
            target=lambda: result.append(post(port, {"instances": [b64(JPEGS[1])]}))
        )
        t.start()
        time.sleep(0.5)  # the request waits in the batch queue for ~2 s
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result and result[0][0] == 200, result
    assert proc.returncode == 0, err
    assert out.strip().endswith("stopped") and "Traceback" not in err


BAD_FLAGS = {
    "policy": (["--model_version_policy=newest"], "model_version_policy: expected latest"),
    "batch": (["--max_batch_size=0"], "max_batch_size: expected a positive int, received 0"),
    "missing": (["--model_base_path=/nonexistent/models"], "model_base_path: expected a directory"),
}


def test_freezing_startup_objects_keeps_later_ones_collectable():
    """Versions load after the freeze: an unloaded one (a reference cycle) must still be freed."""

    class Node:
        pass

    try:
        server.freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        node = Node()
        node.cycle = node
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()


def test_bad_flags_fail_in_one_line(tmp_path):
    savedmodel.export(tiny_model(), "tiny", base_dir=tmp_path, class_names=NAMES, verify=False)

    def extra(name):
        return [] if name == "missing" else [f"--model_base_path={tmp_path / 'tiny'}", "--port=0"]

    check_bad_flags_fail_in_one_line(SCRIPT, BAD_FLAGS, os.environ, extra)


@pytest.mark.parametrize(
    "field, value",
    [("port", 70000), ("threads", 0), ("connection_limit", -1), ("shutdown_timeout", -1.0)],
)
def test_server_config_validation(field, value):
    with pytest.raises(ValueError, match=f"{field}: expected .* received {value!r}"):
        server.ServerConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_version_policy", "latest:0"),
        ("model_version_policy", "specific:"),
        ("max_instances", 0),
        ("max_request_pixels", 1.5),
        ("poll_seconds", 0),
    ],
)
def test_serving_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        serving.ServingConfig(**{field: value})
