"""Verifying an export in a fresh Python process, against the in-memory Keras model.

``verify_export`` (this process) writes the images, the training pipeline's decoding of them and the
model's probabilities to a work directory, then runs ``python -m tlkeras.exports.verify --verify
SAVED_MODEL_DIR WORK_DIR``; that child reloads the SavedModel with ``tf.saved_model.load`` only and
checks signature names, dtypes, shapes and outputs against them (``_check_in_this_process``).

Importing TensorFlow costs the child seconds (8 s on the 2-core machines here), so ``start_verifier``
can start it (``--wait``: import, then read ``SAVED_MODEL_DIR WORK_DIR`` as one JSON line on stdin)
while the export is still being written; ``verify_export(..., process=...)`` hands it the work.
``prestart_verifier`` starts one even earlier, when a run that will export begins: the next
``start_verifier`` hands that one out, by then ready. The parent takes the child's report as soon as
it is printed and does not wait for TensorFlow's teardown at the child's exit.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras import progress  # noqa: E402
from tlkeras.data.decoding import reference_decode  # noqa: E402
from tlkeras.exports.layout import ASSETS_EXTRA, LABELS_FILE  # noqa: E402
from tlkeras.exports.signatures import (  # noqa: E402
    BYTES_INPUT,
    BYTES_SIGNATURE,
    FLOAT_INPUT,
    FLOAT_SIGNATURE,
    OUTPUTS,
    SIGNATURES,
    Head,
    input_size,
    resolve_head,
)

FLOAT_TOLERANCE = 1e-5
# The bytes signature decodes in the graph and the reference eagerly, with the same function; both
# then run the same model, so they agree up to float rounding.
BYTES_TOLERANCE = 1e-4
# A model built under a mixed policy computes in 16 bits; the graph and the eager reference may run
# different kernels (fused or not), so they agree only to that precision (bfloat16 keeps 8 bits of
# mantissa, float16 11), amplified by confident softmax outputs. Measured on MobileNet(0.25)
# mixed_bfloat16: 0.009 (ants/bees, 96 px) and 0.044 (digits, 32 px, EMA) on probabilities; the
# float16 bound is scaled from it by the mantissa bits, not measured (no GPU here).
MIXED_TOLERANCE = {"mixed_bfloat16": 1e-1, "mixed_float16": 2e-2}


def tolerances(model: Any) -> tuple[float, float]:
    """``(float signature, bytes signature)`` tolerances on the probabilities for ``model``."""
    mixed = MIXED_TOLERANCE.get(getattr(getattr(model, "dtype_policy", None), "name", None))
    return (mixed, mixed) if mixed else (FLOAT_TOLERANCE, BYTES_TOLERANCE)


class ExportVerificationError(RuntimeError):
    """The reloaded SavedModel does not match the in-memory Keras model."""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


_prestarted: subprocess.Popen | None = None


def _spawn() -> subprocess.Popen:
    # stderr goes to a file: a pipe nobody reads while stdout is awaited could fill and block.
    errors = tempfile.TemporaryFile(mode="w+", prefix="tlkeras-verify-stderr-")
    process = subprocess.Popen(
        [sys.executable, "-m", "tlkeras.exports.verify", "--wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        env=_child_env(),
    )
    process.errors = errors  # read back on failure
    return process


def start_verifier() -> subprocess.Popen:
    """A fresh Python process that imports TensorFlow now and waits for ``verify_export``'s work
    (the one ``prestart_verifier`` started, if it is still waiting).

    Kill it (``process.kill()``) if the export fails before handing it over.
    """
    global _prestarted
    process, _prestarted = _prestarted, None
    if process is not None and process.poll() is None:
        return process
    return _spawn()


def prestart_verifier() -> None:
    """Start the next export's verifying process now, so its TensorFlow import overlaps training.

    One waits at a time; if no export takes it, it is told to quit when this process exits.
    """
    global _prestarted
    if _prestarted is None or _prestarted.poll() is not None:
        _prestarted = _spawn()
        atexit.register(_discard, _prestarted)


def _discard(process: subprocess.Popen) -> None:
    if process.poll() is None and process is _prestarted:
        process.stdin.close()  # an empty line: the child exits without verifying anything


def verify_export(
    path: str | Path,
    model: Any,
    images: Sequence[bytes],
    *,
    head: Head | None = None,
    class_names: Sequence[str] | None = None,
    timeout: float = 600,
    process: subprocess.Popen | None = None,
    wait: bool = True,
) -> dict[str, Any] | PendingVerification:
    """Reload ``path`` in a fresh Python process and compare it with the in-memory ``model``.

    Checks the signature names, input/output dtypes and shapes, the float signature against
    ``model.predict`` (max abs difference ≤ 1e-5; a mixed-precision model: ``MIXED_TOLERANCE``)
    and the bytes signature against the training
    pipeline's own decoding of ``images`` followed by the model. Returns the child's report;
    raises ``ExportVerificationError`` on any mismatch. ``process``: a ``start_verifier`` child
    to use instead of starting one (it is consumed either way). ``wait=False``: return a
    :class:`PendingVerification` as soon as the child has the work; this process goes on, and
    its ``result()`` reads the report (raising as above).
    """
    path = Path(path)
    images = [bytes(b) for b in images]
    if not images:
        raise ValueError("images: expected at least one encoded image, received none")
    head = head or resolve_head(model, None, None)
    size = input_size(model)
    pixels = reference_decode(images, size)
    # A plain call, not model.predict: under a multi-worker strategy predict gathers from every
    # worker, and only the chief exports. ``served``: with the export's temperature and TTA views.
    expected = head.served(model, pixels).numpy()
    if class_names is None:
        labels = path / ASSETS_EXTRA / LABELS_FILE
        class_names = labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else []
    work = tempfile.TemporaryDirectory(prefix="tlkeras-verify-")
    folder = Path(work.name)
    for i, b in enumerate(images):
        (folder / f"image_{i:04d}.bin").write_bytes(b)
    np.savez(folder / "expected.npz", pixels=pixels, probabilities=expected)
    (folder / "spec.json").write_text(
        json.dumps(
            {
                "input_size": list(size),
                "num_classes": len(class_names),
                "class_names": list(class_names),
                "tolerances": list(tolerances(model)),
            }
        ),
        encoding="utf-8",
    )
    pending = PendingVerification(path, process or start_verifier(), work, timeout)
    pending.hand_over()
    return pending.result() if wait else pending


class PendingVerification:
    """A verification its child process is working on (``verify_export(wait=False)``)."""

    def __init__(self, path: Path, process: subprocess.Popen, work: Any, timeout: float) -> None:
        import threading

        self.path, self.process, self.work = path, process, work
        self.timer = threading.Timer(timeout, process.kill)  # a hung child ends the read with EOF
        self.handed = False

    def hand_over(self) -> None:
        self.timer.start()
        try:
            self.process.stdin.write(json.dumps([str(self.path), self.work.name]) + "\n")
            self.process.stdin.flush()
            self.handed = True
        except (BrokenPipeError, OSError):  # the child died before reading its work
            pass

    def result(self) -> dict[str, Any]:
        """The child's report; raises ``ExportVerificationError`` on a mismatch or a lost child."""
        process, line = self.process, None
        try:
            with progress.step("verify"):
                if self.handed:
                    line = next((x for x in process.stdout if x.startswith("{")), None)
        except (BrokenPipeError, OSError):
            line = None
        finally:
            self.cancel()  # its report is in; TensorFlow's teardown is not needed
        if line is None:
            errors = getattr(process, "errors", None)
            stderr = (errors.seek(0), errors.read())[1] if errors is not None else ""
            raise ExportVerificationError(
                f"verification process failed (exit {process.returncode}): {stderr.strip()[-2000:]}"
            )
        report = json.loads(line)
        if not report.get("ok"):
            raise ExportVerificationError(
                f"exported model at {str(self.path)!r} does not match the Keras model: "
                + "; ".join(report.get("problems", ["unknown"]))
            )
        return report

    def cancel(self) -> None:
        """Stop the child (without reading its report, when the export failed) and remove the
        work folder."""
        self.timer.cancel()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.work.cleanup()


def _check_in_this_process(path: Path, work: Path) -> dict[str, Any]:
    """The fresh process's side of ``verify_export``: TensorFlow only, no Keras model code."""
    spec = json.loads((work / "spec.json").read_text(encoding="utf-8"))
    ref = np.load(work / "expected.npz")
    images = [p.read_bytes() for p in sorted(work.glob("image_*.bin"))]
    h, w = spec["input_size"]
    c = spec["num_classes"]
    problems: list[str] = []
    loaded = tf.saved_model.load(str(path))
    sigs = dict(loaded.signatures)
    report: dict[str, Any] = {"signatures": {}}
    for name in SIGNATURES:
        if name not in sigs:
            problems.append(f"signature {name!r} missing (found {sorted(sigs)})")
    expect_in = {
        BYTES_SIGNATURE: (BYTES_INPUT, tf.string, [None]),
        FLOAT_SIGNATURE: (FLOAT_INPUT, tf.float32, [None, h, w, 3]),
    }
    for name, (key, dtype, shape) in expect_in.items():
        if name not in sigs:
            continue
        fn = sigs[name]
        _, kwargs = fn.structured_input_signature
        outs = fn.structured_outputs
        report["signatures"][name] = {
            "inputs": {n: [s.dtype.name, s.shape.as_list()] for n, s in kwargs.items()},
            "outputs": {n: [s.dtype.name, s.shape.as_list()] for n, s in outs.items()},
        }
        if (
            set(kwargs) != {key}
            or kwargs[key].dtype != dtype
            or kwargs[key].shape.as_list() != shape
        ):
            problems.append(f"{name}: expected input {key} {dtype.name} {shape}, received {kwargs}")
        if set(outs) != set(OUTPUTS):
            problems.append(f"{name}: expected outputs {OUTPUTS}, received {sorted(outs)}")
            continue
        want = {
            "probabilities": (tf.float32, [None, c]),
            "classes": (tf.string, [None, None]),
            "scores": (tf.float32, [None, None]),
        }
        for out, (dt, shp) in want.items():
            got = outs[out]
            if got.dtype != dt or not tf.TensorShape(shp).is_compatible_with(got.shape):
                problems.append(f"{name}: output {out} expected {dt.name} {shp}, received {got}")
    expected = ref["probabilities"]
    results = {}
    if not problems:
        results[FLOAT_SIGNATURE] = sigs[FLOAT_SIGNATURE](
            **{FLOAT_INPUT: tf.constant(ref["pixels"])}
        )
        results[BYTES_SIGNATURE] = sigs[BYTES_SIGNATURE](
            **{BYTES_INPUT: tf.constant(images, dtype=tf.string)}
        )
        float_tol, bytes_tol = spec.get("tolerances", (FLOAT_TOLERANCE, BYTES_TOLERANCE))
        for name, tol in ((FLOAT_SIGNATURE, float_tol), (BYTES_SIGNATURE, bytes_tol)):
            out = {n: t.numpy() for n, t in results[name].items()}
            diff = float(np.max(np.abs(out["probabilities"] - expected)))
            report[f"{name}_max_abs_diff"] = diff
            if diff > tol:
                problems.append(f"{name}: max abs difference {diff:.3g} > {tol:g}")
            top1 = np.argmax(expected, axis=-1)
            want_names = np.array(spec["class_names"])[top1]
            got_names = np.char.decode(out["classes"][:, 0].astype(bytes), "utf-8")
            # Near-ties may swap the top class within tolerance; then the scores must still agree.
            swapped = got_names != want_names
            if (
                swapped.any()
                and np.max(np.abs(out["scores"][swapped, 0] - expected[swapped].max(axis=-1)))
                > bytes_tol
            ):
                problems.append(f"{name}: top-1 classes {got_names} != {want_names}")
    report["num_images"] = len(images)
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _main(argv: list[str]) -> int:
    if argv == ["--wait"]:  # start_verifier: TensorFlow is imported; now wait for the work
        line = sys.stdin.readline()
        if not line.strip():
            return 0  # the parent gave up before handing anything over
        argv = ["--verify", *json.loads(line)]
    if len(argv) != 3 or argv[0] != "--verify":
        print(
            "usage: python -m tlkeras.exports.verify --verify SAVED_MODEL_DIR WORK_DIR | --wait",
            file=sys.stderr,
        )
        return 2
    report = _check_in_this_process(Path(argv[1]), Path(argv[2]))
    print(json.dumps(report, default=str), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
