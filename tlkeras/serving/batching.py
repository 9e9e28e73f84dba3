"""Server-side request batching, as TF Serving's ``--enable_batching``.

Concurrent requests for one model version and signature are queued; a batch thread takes the queued
requests (up to ``max_batch_size`` rows, waiting at most ``batch_timeout_micros`` after the first one
arrived for more), concatenates their inputs along the batch axis, runs the model once and hands each
request its own rows back. Single-image traffic then costs what batched traffic costs: one graph call
per batch instead of one per image.

If a batched call fails (one request's image is corrupt in a way only the decoder notices), each
request of that batch is run alone, so the bad one fails and the others do not.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tlkeras import checks

Arrays = dict[str, np.ndarray]

DEFAULT_MAX_BATCH_SIZE = 32
# Waiting for company costs latency; 2 ms is below the cost of one image on this class of model, and
# while a batch runs the next one gathers anyway (the wait only matters on a quiet server).
DEFAULT_BATCH_TIMEOUT_MICROS = 2000
# TF Serving's default is one batch thread per core; each call is already intra-op parallel, so
# beyond a few they only add memory. Two in parallel overlap one call's serial parts (the per-image
# JPEG decode) with the other's convolutions.
DEFAULT_NUM_BATCH_THREADS = min(4, os.cpu_count() or 1)
DEFAULT_MAX_ENQUEUED_BATCHES = 64


class BatcherClosedError(RuntimeError):
    """The batcher was closed (its version unloaded) before the call was queued."""


class QueueFullError(Exception):
    """More rows are waiting than ``max_enqueued_batches × max_batch_size``: shed load (HTTP 503)."""


@dataclass(frozen=True)
class BatchingConfig:
    """TF Serving's batching parameters (``batching_parameters_file``), validated on creation."""

    # metadata: the options as scripts/serve.py shows them (tlkeras.cli.define_config_flags).
    max_batch_size: int = field(
        default=DEFAULT_MAX_BATCH_SIZE, metadata={"help": "Most rows in one model call."}
    )
    batch_timeout_micros: int = field(
        default=DEFAULT_BATCH_TIMEOUT_MICROS,
        metadata={"help": "Longest wait for more requests once one is queued."},
    )
    num_batch_threads: int = field(
        default=DEFAULT_NUM_BATCH_THREADS, metadata={"help": "Model calls run in parallel."}
    )
    max_enqueued_batches: int = field(
        default=DEFAULT_MAX_ENQUEUED_BATCHES,
        metadata={"help": "Queue bound, in batches; beyond it: 503."},
    )

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            checks.positive_int(name, getattr(self, name))
        checks.integer("batch_timeout_micros", self.batch_timeout_micros, 0)


class _Task:
    __slots__ = ("inputs", "rows", "enqueued", "done", "result", "error")

    def __init__(self, inputs: Arrays) -> None:
        self.inputs = inputs
        self.rows = len(next(iter(inputs.values())))
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.result: Arrays | None = None
        self.error: BaseException | None = None


class Batcher:
    """Gathers concurrent calls of ``fn`` (named arrays in, named arrays out, batch axis 0)."""

    def __init__(
        self,
        fn: Callable[[Arrays], Arrays],
        config: BatchingConfig,
        *,
        on_batch: Callable[[int], None] | None = None,
        name: str = "batcher",
    ) -> None:
        self._fn = fn
        self.config = config
        self._on_batch = on_batch
        self._queue: deque[_Task] = deque()
        self._queued_rows = 0
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(config.num_batch_threads)
        ]
        for t in self._threads:
            t.start()

    def __call__(self, inputs: Arrays, timeout: float | None = None) -> Arrays:
        """Run ``inputs`` in the next batch; raises what ``fn`` raised for them, ``TimeoutError``
        after ``timeout`` seconds, ``QueueFullError`` when the queue is full."""
        task = _Task(inputs)
        limit = self.config.max_enqueued_batches * self.config.max_batch_size
        with self._cv:
            if self._closed:
                raise BatcherClosedError("the batcher is closed")
            if self._queued_rows + task.rows > limit and self._queue:
                raise QueueFullError(
                    f"{self._queued_rows} rows are already waiting for the model (limit {limit})"
                )
            self._queue.append(task)
            self._queued_rows += task.rows
            self._cv.notify()
        if not task.done.wait(timeout):
            raise TimeoutError(f"no answer from the model within {timeout:g} s")
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return task.result

    def close(self) -> None:
        """Finish what is queued, then stop the batch threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    # ----------------------------------------------------------------------------------------------

    def _take(self) -> list[_Task] | None:
        """The next batch: the oldest task and those that fit behind it, once it is full or the
        oldest task has waited ``batch_timeout_micros``. ``None`` when closed and drained."""
        timeout = self.config.batch_timeout_micros / 1e6
        limit = self.config.max_batch_size
        with self._cv:
            while True:
                if not self._queue:
                    if self._closed:
                        return None
                    self._cv.wait()
                    continue
                rows = self._fitting_rows()
                wait = self._queue[0].enqueued + timeout - time.monotonic()
                if rows >= limit or wait <= 0 or self._closed:
                    break
                self._cv.wait(wait)
            batch = [self._queue.popleft()]
            total = batch[0].rows
            while self._queue and total + self._queue[0].rows <= limit:
                total += self._queue[0].rows
                batch.append(self._queue.popleft())
            self._queued_rows -= total
            return batch

    def _fitting_rows(self) -> int:
        total = 0
        for task in self._queue:
            if total and total + task.rows > self.config.max_batch_size:
                break
            total += task.rows
        return total

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Task]) -> None:
        rows = sum(t.rows for t in batch)
        if self._on_batch is not None:
            self._on_batch(rows)
        if len(batch) > 1:
            try:
                joined = {k: np.concatenate([t.inputs[k] for t in batch]) for k in batch[0].inputs}
                out = self._fn(joined)
                if all(v.ndim >= 1 and v.shape[0] == rows for v in out.values()):
                    start = 0
                    for t in batch:
                        t.result = {k: v[start : start + t.rows] for k, v in out.items()}
                        start += t.rows
                        t.done.set()
                    return
            except Exception:  # noqa: BLE001  (one request's bad input: run each alone below)
                pass
        for t in batch:
            try:
                t.result = self._fn(t.inputs)
            except Exception as e:  # noqa: BLE001  (answered to that request only)
                t.error = e
            t.done.set()
