"""The versions a server holds: which to serve (version policy), loading them in the background, and
swapping them in atomically, as TF Serving's model manager does.

A poll (every ``poll_seconds`` in a background thread, as TF Serving's
``--file_system_poll_wait_seconds``) scans ``model_base_path`` for complete versions (numeric folders
with ``saved_model.pb``), picks the ones the policy aspires to, loads each new one, replays its
``assets.extra/tf_serving_warmup_requests`` and only then publishes it: requests never wait for a
load, they are answered by the versions already available. A version that fails to load is reported
(state ``END`` with its error in the status endpoint) and does not replace a working one; it is
retried when its files change. A version removed from disk, or no longer aspired once an aspired one
is available, is unpublished and its batch threads finish their queued work before it is dropped.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras import checks  # noqa: E402
from tlkeras.exports.layout import ASSETS_EXTRA, WARMUP_FILE, complete_versions  # noqa: E402
from tlkeras.exports.loading import ExportedModel, load_exported, tf_error_message  # noqa: E402
from tlkeras.exports.savedmodel import read_warmup_requests  # noqa: E402
from tlkeras.serving.batching import Batcher, BatcherClosedError, BatchingConfig  # noqa: E402

DEFAULT_POLL_SECONDS = 1.0
# TF Serving replays at most this many warmup records.
MAX_WARMUP_RECORDS = 1000
LOADER_NICENESS = 10
LOADING, AVAILABLE, END = "LOADING", "AVAILABLE", "END"
_POLICY_RE = re.compile(
    r"^(latest(?::(?P<n>[0-9]+))?|all|specific:(?P<versions>[0-9]+(?:,[0-9]+)*))$"
)


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ``model_version_policy``: ``latest`` (the newest ``num_versions``), ``all``, or
    ``specific`` versions. Text form: ``latest``, ``latest:2``, ``all``, ``specific:1,3``."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            raise ValueError(
                f"model_version_policy: expected latest, all or specific, received {self.kind!r}"
            )
        if self.kind == "latest" and (
            not isinstance(self.num_versions, int) or self.num_versions < 1
        ):
            raise ValueError(
                f"model_version_policy: latest expects num_versions >= 1, received "
                f"{self.num_versions!r}"
            )
        if self.kind == "specific" and not self.versions:
            raise ValueError("model_version_policy: specific expects at least one version")

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        m = _POLICY_RE.match(text.strip()) if isinstance(text, str) else None
        if not m:
            raise ValueError(
                "model_version_policy: expected latest, latest:N, all or specific:V1,V2,..., "
                f"received {text!r}"
            )
        if m["versions"]:
            return cls(
                "specific", versions=tuple(sorted({int(v) for v in m["versions"].split(",")}))
            )
        if text.strip() == "all":
            return cls("all")
        return cls("latest", num_versions=int(m["n"] or 1))

    def choose(self, candidates: list[int]) -> list[int]:
        """The versions to serve among ``candidates`` (complete and not known to fail)."""
        if self.kind == "all":
            return sorted(candidates)
        if self.kind == "specific":
            return sorted(set(candidates) & set(self.versions))
        return sorted(candidates)[-self.num_versions :]

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all" if self.kind == "all" else f"latest:{self.num_versions}"


class Servable:
    """One loaded version: the model and, with batching on, one batcher per signature."""

    def __init__(
        self,
        model: ExportedModel,
        batching: BatchingConfig | None,
        on_batch: Callable[[int, str, int], None] | None = None,
    ) -> None:
        self.model = model
        self.version = int(model.version) if model.version is not None else 0
        self.signatures = {
            name: fn
            for name, fn in model.signatures.items()
            if not name.startswith("__")  # e.g. __saved_model_init_op: not for clients
        }
        self.warmup_records = 0
        self._batchers: dict[str, Batcher] = {}
        if batching is not None:
            for name, fn in self.signatures.items():
                if _batchable(fn):
                    self._batchers[name] = Batcher(
                        _numpy_fn(fn),
                        batching,
                        on_batch=(lambda rows, s=name: on_batch(self.version, s, rows))
                        if on_batch
                        else None,
                        name=f"batch-v{self.version}-{name}",
                    )

    def input_specs(self, signature: str) -> dict[str, tf.TensorSpec]:
        return self.signatures[signature].structured_input_signature[1]

    def run(
        self, signature: str, inputs: dict[str, np.ndarray], timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """Outputs for ``inputs``; through the signature's batcher when there is one."""
        batcher = self._batchers.get(signature)
        if batcher is not None:
            try:
                return batcher(inputs, timeout)
            except BatcherClosedError:  # unloaded between lookup and call: answer directly
                pass
        return _numpy_fn(self.signatures[signature])(inputs)

    def close(self) -> None:
        for b in self._batchers.values():
            b.close()


def _batchable(fn: Any) -> bool:
    """Every input has a free leading (batch) dimension."""
    specs = fn.structured_input_signature[1].values()
    return bool(specs) and all(s.shape.rank and s.shape[0] is None for s in specs)


def _numpy_fn(fn: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    specs = fn.structured_input_signature[1]

    def call(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}

    return call


def replay_warmup(servable: Servable) -> int:
    """Run the version's TF Serving warmup records (``assets.extra``) through it; returns how many."""
    path = servable.model.path / ASSETS_EXTRA / WARMUP_FILE
    if not path.is_file():
        return 0
    from tensorflow.core.framework import tensor_pb2

    n = 0
    for log in read_warmup_requests(path)[:MAX_WARMUP_RECORDS]:
        request = log.predict_log.request
        signature = request.model_spec.signature_name or "serving_default"
        inputs = {
            # The warmup messages come from a private descriptor pool: copy through the wire format.
            k: tf.make_ndarray(tensor_pb2.TensorProto.FromString(v.SerializeToString()))
            for k, v in request.inputs.items()
        }
        servable.run(signature, inputs)
        n += 1
    return n


@dataclass
class VersionState:
    """What the status endpoint reports for one version."""

    state: str
    stamp: float = 0.0
    error: str = ""
    warmup_records: int = 0


class ModelManager:
    """Loads, serves and unloads the versions of one model; see the module docstring."""

    def __init__(
        self,
        model_base_path: str | Path,
        model_name: str,
        *,
        policy: VersionPolicy | None = None,
        batching: BatchingConfig | None = None,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        on_batch: Callable[[int, str, int], None] | None = None,
        loader: Callable[[Path], ExportedModel] = load_exported,
    ) -> None:
        self.base = Path(model_base_path)
        self.name = model_name
        if not self.base.is_dir():
            raise FileNotFoundError(
                f"model_base_path: expected a directory of numeric version folders, "
                f"received {str(self.base)!r}"
            )
        checks.number("poll_seconds", poll_seconds, low=0, low_open=True)
        self.policy = policy or VersionPolicy()
        self.batching = batching
        self.poll_seconds = float(poll_seconds)
        self._on_batch = on_batch
        self._loader = loader
        self._servables: dict[int, Servable] = {}  # replaced whole, never mutated: no lock
        self._states: dict[int, VersionState] = {}
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading (request threads) -------------------------------------------------------------

    def get(self, version: int | None = None) -> Servable:
        """The servable for ``version``, or the highest available; ``LookupError`` saying why not."""
        servables = self._servables
        if version is None:
            if servables:
                return servables[max(servables)]
            raise LookupError(f"Servable not found for request: Latest({self.name})" + self._why())
        if version in servables:
            return servables[version]
        state = self._states.get(version)
        why = ""
        if state is not None and state.state == LOADING:
            why = f": version {version} is still loading"
        elif state is not None and state.error:
            why = f": {state.error}"
        raise LookupError(f"Servable not found for request: Specific({self.name}, {version}){why}")

    def _why(self) -> str:
        errors = [s.error for s in self._states.values() if s.error]
        return (": " + "; ".join(errors)) if errors else ""

    def statuses(self) -> dict[int, VersionState]:
        return dict(self._states)

    @property
    def available(self) -> list[int]:
        return sorted(self._servables)

    # -- polling (one thread) ------------------------------------------------------------------

    def _on_disk(self) -> dict[int, float]:
        """Complete versions and their ``saved_model.pb`` mtime (a rewritten version reloads)."""
        found = {}
        try:
            versions = complete_versions(self.base)
        except OSError:
            return {}
        for v in versions:
            try:
                found[v] = (self.base / str(v) / "saved_model.pb").stat().st_mtime
            except OSError:
                continue  # removed since the scan
        return found

    def poll(self) -> None:
        """Load what the policy aspires to and is new, then publish; unload what is no longer
        wanted. Blocking; the background thread calls it every ``poll_seconds``."""
        with self._poll_lock:
            disk = self._on_disk()
            failed = {
                v
                for v, s in self._states.items()
                if s.state == END and s.error and disk.get(v) == s.stamp
            }
            aspired = self.policy.choose([v for v in disk if v not in failed])
            servables = self._servables
            for v in sorted(aspired, reverse=True):  # newest first: it answers default requests
                current = servables.get(v)
                if current is not None and self._states[v].stamp == disk[v]:
                    continue
                self._states[v] = VersionState(LOADING, disk[v])
                try:
                    servable = self._load(v)
                except Exception as e:  # noqa: BLE001  (any failure: reported, old one kept)
                    self._states[v] = VersionState(END, disk[v], f"failed to load version {v}: {e}")
                    continue
                servables = {**servables, v: servable}
                self._servables = servables
                self._states[v] = VersionState(AVAILABLE, disk[v], "", servable.warmup_records)
                if current is not None:
                    current.close()
            # Unload: gone from disk, or not aspired once an aspired version is available.
            keep_unaspired = not any(v in servables for v in aspired)
            drop = [
                v for v in servables if v not in disk or (v not in aspired and not keep_unaspired)
            ]
            if drop:
                self._servables = {v: s for v, s in servables.items() if v not in drop}
                for v in drop:
                    servables[v].close()  # queued requests finish first
                    self._states[v] = VersionState(END, disk.get(v, 0.0))
            for v in list(self._states):
                if v not in disk and v not in self._servables:
                    del self._states[v]

    def _load(self, version: int) -> Servable:
        try:
            model = self._loader(self.base / str(version))
        except tf.errors.OpError as e:
            raise ValueError(tf_error_message(e)) from None
        servable = Servable(model, self.batching, self._on_batch)
        try:
            servable.warmup_records = replay_warmup(servable)
        except Exception as e:
            servable.close()
            raise ValueError(f"warmup request failed: {' '.join(str(e).split())[:300]}") from None
        return servable

    def start(self) -> None:
        """First poll here (a model that cannot be served fails now, not on a request), then poll
        in the background."""
        self.poll()
        if not self._servables:
            raise ValueError(f"model_base_path: {self._unavailable_message()}")
        self._thread = threading.Thread(target=self._poll_forever, name="version-poll", daemon=True)
        self._thread.start()

    def _unavailable_message(self) -> str:
        if self._states:
            return "; ".join(s.error for s in self._states.values() if s.error)
        return (
            f"no servable version of {self.name} under {str(self.base)!r} (policy {self.policy}): "
            "expected numeric folders holding saved_model.pb"
        )

    def _poll_forever(self) -> None:
        try:  # Linux: a thread's own nice value. Loading yields the CPU to answering requests.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)
        except (AttributeError, OSError):
            pass
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001  (the poller must outlive a bad scan)
                continue

    def close(self) -> None:
        """Stop polling and unload everything (queued requests finish first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._poll_lock:
            servables = self._servables
            self._servables = {}
            for s in servables.values():
                s.close()
