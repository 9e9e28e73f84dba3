"""Verifying an edge conversion: run in LiteRT or onnxruntime in a fresh process next to the
SavedModel, measured (top-1 agreement, max probability difference, accuracy, latency), and a float
conversion that disagrees refused (``PARITY_TOLERANCE``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras.exports import edge_runtime
from tlkeras.exports.edge_convert import Source
from tlkeras.exports.edge_formats import PARITY_TOLERANCE, EdgeConfig, EdgeExportError

# --------------------------------------------------------------------------------------------------
# Running an edge model: ``tlkeras.exports.edge_runtime`` (no TensorFlow), in a fresh process to verify.
# Why a fresh process: the converter's calibrator loads TensorFlow's own TFLite runtime, and LiteRT
# beside it in one process aborted (double free) while allocating a quantized model's tensors;
# and LiteRT's XNNPACK delegate aborts on some int8 files by itself (see the fallback below).


def verify_conversion(
    source: Source,
    config: EdgeConfig,
    model_file: Path,
    pixels: np.ndarray,
    labels: Any,
    *,
    images_given: bool,
    work: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model_file`` run on ``pixels`` next to ``source``'s SavedModel: ``(report, runtime facts
    for metadata)``; an ``EdgeExportError`` when it does not run or a float conversion disagrees."""
    run, runtime = _run_verified(source, config, model_file, pixels, work)
    report = measure(run["probabilities"], source.probabilities(pixels), labels)
    report["latency_ms_per_image"] = float(run["latency_ms"])
    report["runtime"] = edge_runtime.runtime_name(model_file)
    report["images"] = "given" if images_given else "synthetic"
    _refuse_if_float_disagrees(source, config, report)
    return report, runtime


def _run_fresh(model_file: Path, pixels: np.ndarray, work: Path, delegates: bool) -> dict[str, Any]:
    """``edge_runtime`` run as a script in a fresh process (no TensorFlow in it, as on a device):
    probabilities and latency, or ``{"error": ...}`` when the runtime fails or dies."""
    np.save(work / "pixels.npy", pixels)
    out = work / "run.npz"
    cmd = [
        sys.executable,
        edge_runtime.__file__,
        str(model_file),
        str(work / "pixels.npy"),
        str(out),
    ]
    if not delegates:
        cmd.append("--no_delegates")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        noise = ("INFO:", "WARNING:", " ", "Current thread", "Extension modules", "Fatal Python")
        lines = [ln for ln in (done.stderr or "").splitlines() if ln.strip()]
        said = [ln for ln in lines if not ln.startswith(noise)] or lines or ["no message"]
        why = said[-1] if done.returncode > 0 else said[0]
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode} ({why})"
        return {"error": why[:300]}
    with np.load(out) as result:
        report = {k: result[k] for k in result.files}
    out.unlink()
    return report


def _run_verified(
    source: Source, config: EdgeConfig, model_file: Path, pixels: np.ndarray, work: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's outputs on ``pixels`` in a fresh LiteRT/onnxruntime process, with the runtime's
    default CPU delegate (XNNPACK), else without: ``(result, runtime facts for metadata)``."""
    result = _run_fresh(model_file, pixels, work, delegates=True)
    runtime: dict[str, Any] = {"delegates": "default"}
    if "error" in result and config.format == "tflite":
        first = result["error"]
        result = _run_fresh(model_file, pixels, work, delegates=False)
        runtime = {"delegates": "none", "default_delegates_failed": first}
    if "error" in result:
        raise EdgeExportError(
            f"{source.backbone}: the {config.name} file does not run in "
            f"{edge_runtime.runtime_name(model_file)}: {result['error']}; nothing written"
        )
    return result, runtime


def measure(got: np.ndarray, ref: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Edge probabilities ``got`` next to the SavedModel's ``ref``: agreement, accuracy."""
    report: dict[str, Any] = {
        "num_images": len(got),
        "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
        "max_abs_prob_diff": float(np.abs(got - ref).max()),
    }
    if labels is not None:
        labels = np.asarray(labels)
        report["accuracy"] = float(np.mean(got.argmax(-1) == labels))
        report["reference_accuracy"] = float(np.mean(ref.argmax(-1) == labels))
        report["accuracy_change"] = report["accuracy"] - report["reference_accuracy"]
    return report


def _refuse_if_float_disagrees(source: Source, config: EdgeConfig, report: dict) -> None:
    if not config.is_float:
        return
    if report["top1_agreement"] < 1.0 or report["max_abs_prob_diff"] > PARITY_TOLERANCE:
        raise EdgeExportError(
            f"{source.backbone}: the {config.name} conversion disagrees with the SavedModel "
            f"(top-1 agreement {report['top1_agreement']:.1%}, max |probability difference| "
            f"{report['max_abs_prob_diff']:.2e} > {PARITY_TOLERANCE:g} allowed); nothing written"
        )
