"""What a long run shows while it works, and where its time went.

- :class:`Progress`: a count over a known total (files scanned, images embedded). On a terminal it
  rewrites one line; elsewhere (a log file, CI) it prints a plain line at most every
  ``LOG_INTERVAL_S`` seconds and a last one. Never ANSI escapes: a log stays readable.
- :func:`step`: times one step of a run (scan, feature caching, report, export…) and records it with
  the process's peak resident memory so far. Steps nest; a nested step's seconds are not counted
  again in its parent's, so the recorded steps add up to the run. ``tlkeras.train`` writes them to
  ``metrics.json`` as ``timings`` (``benchmarks/scale.py`` fits each step's cost against the number
  of images).

A module of plain Python (no TensorFlow): every layer can use it.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

# A count is worth showing only past this many seconds since its start (short ones stay quiet).
SHOW_AFTER_S = 2.0
# Not on a terminal: at most one line per this many seconds (plus the last).
LOG_INTERVAL_S = 10.0

# Recorded steps of the current run, in order: {"step", "seconds", "peak_rss_mib"}.
_steps: list[dict[str, Any]] = []
_open: list[list[float]] = []  # per open step: [start, seconds spent in nested steps]
_imports_s: float | None = None  # process start -> script's main (set once, by tlkeras.cli)
_quiet = False
_active = False  # a run is recording (begin_run .. end_run)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss``: KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def process_seconds() -> float | None:
    """Seconds since this process started (its interpreter start), or ``None`` if unknown."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # psutil missing or unsupported platform
        return None


def mark_imports_done() -> None:
    """Called by a script's entry point once its imports are done: the first run it starts records
    the process's start-up (interpreter and imports) as its ``imports`` step."""
    global _imports_s
    _imports_s = process_seconds()


def begin_run(*, quiet: bool = False) -> None:
    """Start recording a new run's steps (``quiet``: no progress lines)."""
    global _imports_s, _quiet, _active
    _steps.clear()
    _open.clear()
    _quiet, _active = quiet, True
    if _imports_s is not None:
        _steps.append({"step": "imports", "seconds": round(_imports_s, 3)})
        _imports_s = None  # a second run in the same process did not pay for them


def running() -> bool:
    """Whether a run is recording its steps (between :func:`begin_run` and :func:`end_run`)."""
    return _active


def end_run() -> list[dict[str, Any]]:
    """Stop recording; the run's :func:`timings`."""
    global _active, _quiet
    _active, _quiet = False, False
    return timings()


def timings() -> list[dict[str, Any]]:
    """The recorded steps, same-named ones merged (seconds summed, peak memory the largest), in
    order of first appearance."""
    merged: dict[str, dict[str, Any]] = {}
    for s in _steps:
        m = merged.setdefault(s["step"], {"step": s["step"], "seconds": 0.0})
        m["seconds"] = round(m["seconds"] + s["seconds"], 3)
        if "peak_rss_mib" in s:
            m["peak_rss_mib"] = max(m.get("peak_rss_mib", 0.0), s["peak_rss_mib"])
    return list(merged.values())


def say(message: str) -> None:
    """Print one progress line (unless the run is quiet)."""
    if not _quiet:
        print(message, flush=True)


@contextlib.contextmanager
def step(name: str, message: str | None = None) -> Iterator[None]:
    """Time the enclosed code as step ``name``; print ``message`` first (and its time after) when
    given."""
    if message:
        say(f"{message}…")
    started = time.perf_counter()
    _open.append([started, 0.0])
    try:
        yield
    finally:
        _, nested = _open.pop()
        total = time.perf_counter() - started
        if _open:
            _open[-1][1] += total
        _steps.append(
            {
                "step": name,
                "seconds": round(total - nested, 3),
                "peak_rss_mib": round(peak_rss_mib(), 1),
            }
        )
        if message:
            say(f"  {name}: {total:.1f} s")


class Progress:
    """A count of ``total`` ``unit``s done so far, shown as ``label: done/total unit (pct %)``
    (``total`` 0: not known, ``label: done unit``).

    ``update(done)`` as often as convenient: it prints only when the count has run for
    ``SHOW_AFTER_S`` and (off a terminal) ``LOG_INTERVAL_S`` passed since the last line.
    ``close()`` prints the last line if any was shown.
    """

    def __init__(self, total: int, label: str, unit: str, stream: TextIO | None = None) -> None:
        self.total, self.label, self.unit = int(total), label, unit
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.last_shown: float | None = None
        self.done = 0

    def _line(self, done: int) -> str:
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{done:,}"
        if self.total > 0:  # 0: not known in advance
            count += f"/{self.total:,} {self.unit} ({100.0 * done / self.total:.0f} %)"
        else:
            count += f" {self.unit}"
        return f"{self.label}: {count}, {elapsed:.0f} s, {rate:,.0f} {self.unit}/s"

    def update(self, done: int) -> None:
        self.done = int(done)
        if _quiet:
            return
        now = time.perf_counter()
        if now - self.started < SHOW_AFTER_S:
            return
        interval = 0.2 if self.tty else LOG_INTERVAL_S
        if self.last_shown is not None and now - self.last_shown < interval:
            return
        self.last_shown = now
        end = "" if self.tty else "\n"
        self.stream.write(("\r" if self.tty else "") + self._line(self.done) + end)
        self.stream.flush()

    def close(self) -> None:
        if self.last_shown is None or _quiet:
            return
        self.stream.write(("\r" if self.tty else "") + self._line(self.done) + "\n")
        self.stream.flush()
