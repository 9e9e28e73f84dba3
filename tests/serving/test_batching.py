"""tlkeras.serving.batching: concurrent calls gathered into batches, each caller gets its own rows."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tlkeras.serving.batching import Batcher, BatcherClosedError, BatchingConfig, QueueFullError


class Recorder:
    """A model stand-in: doubles its input, refuses negative rows, records each call's size."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, inputs):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        x = inputs["x"]
        self.calls.append(len(x))
        if (x < 0).any():
            raise ValueError("negative input")
        return {"y": x * 2, "n": np.full(len(x), len(x))}


def call_together(batcher, requests, timeout=10):
    """Call ``batcher`` with each request from its own thread, all at once."""
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i):
        start.wait()
        try:
            results[i] = batcher({"x": requests[i]}, timeout)
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_each_request_gets_its_own_rows_from_one_call():
    fn = Recorder()
    # A long timeout: the batch waits for everybody (it is full at 1+2+3+4 = 10 rows).
    batcher = Batcher(fn, BatchingConfig(max_batch_size=10, batch_timeout_micros=5_000_000))
    try:
        requests = [np.arange(n, dtype=float) + 10 * n for n in (1, 2, 3, 4)]
        t0 = time.monotonic()
        results = call_together(batcher, requests)
        assert time.monotonic() - t0 < 4  # full batch: no waiting for the timeout
    finally:
        batcher.close()
    assert fn.calls == [10]
    for x, out in zip(requests, results, strict=True):
        np.testing.assert_array_equal(out["y"], x * 2)
        assert list(out["n"]) == [10] * len(x)


def test_one_bad_instance_fails_only_its_own_request():
    fn = Recorder()
    batcher = Batcher(fn, BatchingConfig(max_batch_size=6, batch_timeout_micros=5_000_000))
    try:
        requests = [np.ones(1), np.array([1.0, -1.0]), np.ones(3)]
        results = call_together(batcher, requests)
    finally:
        batcher.close()
    assert fn.calls[0] == 6 and sorted(fn.calls[1:]) == [1, 2, 3]  # batch failed: each alone
    assert isinstance(results[1], ValueError) and "negative" in str(results[1])
    np.testing.assert_array_equal(results[0]["y"], [2.0])
    np.testing.assert_array_equal(results[2]["y"], [2.0] * 3)
    assert list(results[2]["n"]) == [3, 3, 3]


def test_batches_never_exceed_max_batch_size_and_a_big_request_runs_alone():
    fn = Recorder()
    batcher = Batcher(fn, BatchingConfig(max_batch_size=4, batch_timeout_micros=200_000))
    try:
        requests = [np.ones(n) for n in (3, 3, 1, 6)]
        results = call_together(batcher, requests)
    finally:
        batcher.close()
    assert all(not isinstance(r, Exception) for r in results)
    assert sorted(fn.calls) in ([1, 3, 3, 6], [3, 4, 6])
    assert max(c for c in fn.calls if c != 6) <= 4


def test_the_timeout_bounds_the_wait_for_company():
    fn = Recorder()
    batcher = Batcher(fn, BatchingConfig(max_batch_size=32, batch_timeout_micros=100_000))
    try:
        t0 = time.monotonic()
        out = batcher({"x": np.ones(2)}, 10)
        waited = time.monotonic() - t0
    finally:
        batcher.close()
    assert fn.calls == [2] and 0.09 < waited < 5
    np.testing.assert_array_equal(out["y"], [2.0, 2.0])


def test_a_full_queue_sheds_load_and_a_slow_model_times_out():
    gate = threading.Event()
    fn = Recorder(gate)
    config = BatchingConfig(
        max_batch_size=1, batch_timeout_micros=0, max_enqueued_batches=1, num_batch_threads=1
    )
    batcher = Batcher(fn, config)
    try:
        first = threading.Thread(target=batcher, args=({"x": np.ones(1)}, 10))
        first.start()
        assert fn.entered.wait(10)  # the batch thread is inside the model, blocked
        with pytest.raises(TimeoutError, match="0.2 s"):
            batcher({"x": np.ones(1)}, 0.2)  # queued behind the blocked call
        with pytest.raises(QueueFullError, match="limit 1"):
            batcher({"x": np.ones(1)}, 0.2)
        gate.set()
        first.join()
    finally:
        gate.set()
        batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher({"x": np.ones(1)})


def test_close_finishes_queued_work():
    fn = Recorder()
    batcher = Batcher(fn, BatchingConfig(max_batch_size=8, batch_timeout_micros=2_000_000))
    results = []
    t = threading.Thread(target=lambda: results.append(batcher({"x": np.ones(2)}, 10)))
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    batcher.close()  # does not wait for the 2 s batch timeout, and does not drop the request
    t.join()
    assert time.monotonic() - t0 < 1.5
    np.testing.assert_array_equal(results[0]["y"], [2.0, 2.0])


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_batch_size", 0),
        ("max_batch_size", 2.5),
        ("num_batch_threads", 0),
        ("max_enqueued_batches", True),
        ("batch_timeout_micros", -1),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"{field}: expected .* received {value!r}"):
        BatchingConfig(**{field: value})
