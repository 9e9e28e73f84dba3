"""Running an edge export (``.tflite`` in LiteRT, ``.onnx`` in onnxruntime) without TensorFlow.

Imports NumPy and the runtime only, so ``tlkeras.exports.edge`` can run this file as a script in a fresh
process to verify a conversion as a device would, with no TensorFlow (and no second TFLite
runtime) in it; a runtime that aborts then takes only that process down::

    python tlkeras/exports/edge_runtime.py MODEL PIXELS.npy OUT.npz [--no_delegates]

writes ``probabilities`` (float32 [N, C]) and ``latency_ms`` (median for one image) to OUT.npz.
``EdgeRunner`` is the same code in-process, for ``scripts/predict.py`` and ``evaluate.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Images timed for the latency (after one warm-up call).
LATENCY_IMAGES = 50


def runtime_name(path: str | Path) -> str:
    return "onnxruntime" if Path(path).suffix == ".onnx" else "LiteRT (ai-edge-litert)"


class EdgeRunner:
    """A ``.tflite`` or ``.onnx`` file run on float32 pixels ``[N, H, W, 3]`` (0-255), returning
    float32 probabilities: the input is quantized and the output dequantized where the model is
    integer. ``delegates=False``: LiteRT's reference kernels only (no XNNPACK)."""

    def __init__(self, path: str | Path, *, delegates: bool = True) -> None:
        self.path = Path(path)
        if self.path.suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError as e:
                raise ImportError(
                    f"{self.path.name}: running ONNX needs onnxruntime (pip install "
                    f"'tlkeras[onnx]'): {e}"
                ) from e
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            self._session = onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
            shape = self._session.get_inputs()[0].shape
        else:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType

            kwargs: dict[str, Any] = {}
            if not delegates:
                kwargs["experimental_op_resolver_type"] = (
                    OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
                )
            self._interpreter = Interpreter(model_path=str(self.path), **kwargs)
            self._interpreter.allocate_tensors()
            self._input = self._interpreter.get_input_details()[0]
            self._output = self._interpreter.get_output_details()[0]
            shape = self._input["shape"]
        self.image_size = (int(shape[1]), int(shape[2]))

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        inp, out, it = self._input, self._output, self._interpreter
        if inp["dtype"] != np.float32:  # integer input: quantize with the model's own scale
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype("float32") - zero) * scale
        return y.astype("float32")

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, dtype="float32")
        if hasattr(self, "_session"):
            name = self._session.get_inputs()[0].name
            return self._session.run(None, {name: pixels})[0].astype("float32")
        return np.concatenate([self._invoke(x[None]) for x in pixels])  # TFLite: batch 1

    def latency_ms(self, pixels: np.ndarray) -> float:
        """Median milliseconds for one image, over at most ``LATENCY_IMAGES``."""
        pixels = np.asarray(pixels, dtype="float32")[:LATENCY_IMAGES]
        self.predict(pixels[:1])
        times = []
        for x in pixels:
            start = time.perf_counter()
            self.predict(x[None])
            times.append((time.perf_counter() - start) * 1e3)
        return float(np.median(times))


def describe(path: str | Path) -> dict[str, Any]:
    """Input/output dtypes and quantization parameters of an edge model file (reference kernels:
    reading the details needs no delegate)."""
    if Path(path).suffix == ".onnx":
        return {"input_dtype": "float32", "output_dtype": "float32"}
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    out: dict[str, Any] = {}
    for side, d in (("input", it.get_input_details()[0]), ("output", it.get_output_details()[0])):
        out[f"{side}_dtype"] = np.dtype(d["dtype"]).name
        if out[f"{side}_dtype"] != "float32":
            scale, zero = d["quantization"]
            out[f"{side}_quantization"] = {"scale": float(scale), "zero_point": int(zero)}
    return out


def _main(argv: list[str]) -> int:
    model, pixels, out = argv[1:4]
    runner = EdgeRunner(model, delegates="--no_delegates" not in argv)
    x = np.load(pixels)
    probabilities = runner.predict(x)
    np.savez(out, probabilities=probabilities, latency_ms=runner.latency_ms(x))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
