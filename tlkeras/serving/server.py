"""The serving process: the app of ``tlkeras.serving.app`` behind Waitress, a production WSGI server.

Why Waitress: maintained (Pylons), pure Python on every OS, one process with a bounded thread pool —
which batching needs (the requests it gathers must share one model in one process; a pre-fork server
would hold one model and one batch queue per worker). Idle or slow connections are closed after
``idle_timeout``; at most ``connection_limit`` are open. A prediction that waits longer than
``ServingConfig.request_timeout`` is answered 503.

Graceful shutdown (SIGTERM, SIGINT or ``shutdown()``): the listening socket is closed at once (new
connections are refused, so a load balancer moves on), requests already received run to the end and
their answers are sent, then batch threads and versions are unloaded. After ``shutdown_timeout``
seconds whatever is left is cut.
"""

from __future__ import annotations

import gc
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlkeras import checks
from tlkeras.serving.app import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    METRICS_PATH,
    ServingConfig,
    create_app,
)
from tlkeras.serving.request import too_large_message

DEFAULT_THREADS = 32
DEFAULT_CONNECTION_LIMIT = 256
DEFAULT_IDLE_TIMEOUT = 120
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
INBUF_OVERFLOW = 8 * 2**20


@dataclass(frozen=True)
class ServerConfig:
    """The process around the app: where it listens and how much it takes on at once."""

    # metadata: the options as scripts/serve.py shows them (tlkeras.cli.define_config_flags).
    host: str = field(
        default=DEFAULT_HOST,
        metadata={"help": "Interface to bind; 0.0.0.0 exposes it to the network."},
    )
    port: int = field(
        default=DEFAULT_PORT,
        metadata={"help": "REST port (TF Serving's is 8501).", "lower_bound": 0},
    )
    # Request threads; batching gathers at most this many concurrent requests into one call.
    threads: int = field(
        default=DEFAULT_THREADS, metadata={"help": "Request threads (bounded pool)."}
    )
    connection_limit: int = field(
        default=DEFAULT_CONNECTION_LIMIT, metadata={"help": "Most open connections."}
    )
    idle_timeout: int = field(
        default=DEFAULT_IDLE_TIMEOUT,
        metadata={"help": "Seconds before an idle or stalled connection is closed."},
    )
    shutdown_timeout: float = field(
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        metadata={"help": "On SIGTERM, seconds in-flight requests get to finish."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host: expected an interface name or address, received {self.host!r}")
        if not checks.is_int(self.port) or not 0 <= self.port < 2**16:
            raise ValueError(
                f"port: expected 0..65535 (0 picks a free one), received {self.port!r}"
            )
        for name in ("threads", "connection_limit", "idle_timeout"):
            checks.positive_int(name, getattr(self, name))
        checks.number("shutdown_timeout", self.shutdown_timeout, low=0, kind="seconds")


class _InFlight:
    """WSGI middleware counting requests between arrival and the last byte of their answer."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        with self._lock:
            self.count += 1
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self._done()
            raise
        return _Closing(body, self._done)

    def _done(self) -> None:
        with self._lock:
            self.count -= 1


class _Closing:
    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self.body, self.on_close = body, on_close

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.on_close()


def _json_error_channel(max_request_bytes: int) -> type:
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        def execute(self) -> None:
            e = self.request.error
            text = (
                too_large_message(max_request_bytes) if e.code == 413 else f"{e.reason}: {e.body}"
            )
            body = json.dumps({"error": text}).encode()
            self.status = f"{e.code} {e.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    return JsonErrorChannel


class Server:
    """A running Waitress server for one model; ``serve_forever()`` until ``shutdown()``."""

    def __init__(self, app: Any, config: ServerConfig, max_request_bytes: int) -> None:
        import waitress

        self.app = app
        self.config = config
        self._wsgi = _InFlight(app)
        self._server = waitress.create_server(
            self._wsgi,
            host=config.host,
            port=config.port,
            threads=config.threads,
            connection_limit=config.connection_limit,
            channel_timeout=config.idle_timeout,
            max_request_body_size=max_request_bytes,
            # Bodies up to 8 MiB stay in memory (Waitress's default spills at 512 KiB to a temp
            # file: every batch-32 request of photos would).
            inbuf_overflow=min(max_request_bytes, INBUF_OVERFLOW),
            ident="tlkeras",
        )
        # Errors Waitress answers before the app sees the request get TF Serving's JSON too.
        self._server.channel_class = _json_error_channel(max_request_bytes)
        self._stop = threading.Event()
        self._stopped = threading.Event()

    @property
    def server_port(self) -> int:
        return int(self._server.effective_port)

    @property
    def in_flight(self) -> int:
        return self._wsgi.count

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        from waitress import wasyncore

        server, sockets = self._server, self._server._map
        deadline = None
        try:
            while True:
                wasyncore.loop(timeout=poll_interval, map=sockets, count=1)
                if not self._stop.is_set():
                    continue
                if deadline is None:  # stop listening: new connections are refused from now on
                    deadline = time.monotonic() + self.config.shutdown_timeout
                    server.accepting = False
                    server.del_channel()
                    server.socket.close()
                if (self._idle() and self.in_flight == 0) or time.monotonic() > deadline:
                    break
        finally:
            server.task_dispatcher.shutdown(timeout=max(0.0, (deadline or 0) - time.monotonic()))
            wasyncore.close_all(sockets)
            self.app.extensions["tlkeras_manager"].close()
            self._stopped.set()

    def _idle(self) -> bool:
        """No channel has a request being read, run, or an answer still being sent."""
        from waitress.channel import HTTPChannel

        return not any(
            ch.requests or ch.total_outbufs_len
            for ch in list(self._server._map.values())
            if isinstance(ch, HTTPChannel)
        )

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown; safe from a signal handler or any thread."""
        self._stop.set()
        try:
            self._server.pull_trigger()  # wake the loop now, not after poll_interval
        except OSError:
            pass

    def shutdown(self, timeout: float | None = None) -> None:
        """Graceful shutdown; returns when ``serve_forever`` has returned."""
        self.request_shutdown()
        self._stopped.wait(timeout)


def freeze_startup_objects() -> None:
    """Move every object alive now (TensorFlow's and Keras's modules: ~400 k objects) out of the
    garbage collector's reach; call once after the imports, before loading any version.

    A full collection walks every tracked object and holds the GIL meanwhile: ~200 ms here, and
    loading a version triggers several, each a stall for every request in flight. Frozen, the walk
    covers only the versions and requests (~10 ms). Versions load after the freeze, so an unloaded
    one is still collected. (``gc.freeze``, as long-lived servers such as Instagram's use it.)
    """
    gc.collect()
    gc.freeze()


def make_server(
    model_base_path: str | Path,
    model_name: str,
    serving: ServingConfig | None = None,
    server: ServerConfig | None = None,
) -> Server:
    """A server ready to ``serve_forever()``; the model's versions are loaded here, so a bad model
    path fails now (``ValueError``/``FileNotFoundError``) rather than on a request."""
    serving = serving or ServingConfig()
    server = server or ServerConfig()
    app = create_app(model_base_path, model_name, serving)
    try:
        return Server(app, server, serving.max_request_bytes)
    except Exception:
        app.extensions["tlkeras_manager"].close()
        raise


def serve(server: Server, on_ready: Callable[[Server], None] | None = None) -> None:
    """Run ``server`` in this (main) thread until SIGTERM/SIGINT, then shut down gracefully."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda *_: server.request_shutdown())
    try:
        if on_ready is not None:
            on_ready(server)
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ready_message(server: Server, model_name: str) -> str:
    manager = server.app.extensions["tlkeras_manager"]
    url = f"http://{server.config.host}:{server.server_port}"
    return (
        f"serving {model_name} versions {manager.available} from {manager.base} at "
        f"{url}/v1/models/{model_name} (metrics: {url}{METRICS_PATH})"
    )
