"""Edge export: a tlkeras classifier as a TFLite or ONNX file, measured before it is written.

``export_edge`` (and ``export_tflite``/``export_onnx``) converts a tlkeras SavedModel, or a Keras
model exported to a temporary one first, from its float signature ``serving_float``: the bytes
signature decodes JPEG in the graph, which is not a TFLite builtin. What is written::

    <out>/model.tflite | model.onnx   input ``images`` raw 0-255 RGB pixels (the backbone's
                                      preprocessing is inside), output ``probabilities``
    <out>/labels.txt                  one class name a line, in output order
    <out>/metadata.json               input size and type, quantization parameters,
                                      preprocessing, class names and the verification below

TFLite models take one image (``[1, H, W, 3]``: the shape phone and microcontroller runtimes
want); ONNX models take a batch. Quantization (``QUANTIZATIONS``): ``none`` (float32),
``float16`` weights, ``dynamic`` (int8 weights, float activations) and ``int8`` (full integer,
calibrated on a representative dataset drawn from the training images; ``io_type`` says whether
the interface is uint8, int8 or float32).

Every conversion is run (LiteRT's interpreter; onnxruntime for ONNX) on held-out images next to
the SavedModel: top-1 agreement, max probability difference, accuracy when labels are given, file
size and latency per image. A float conversion (``none``, ONNX) that disagrees with the SavedModel
(which itself matches the Keras model to 1e-5, ``tlkeras.exports.verify``) is refused and nothing is
written; a quantized one is written and its accuracy change reported: that trade is the user's.

The parts: ``tlkeras.exports.edge_formats`` (``EdgeConfig`` and the names), ``edge_convert`` (the
source and the converters), ``edge_verify`` (the fresh-process run and its measures),
``edge_runtime`` (running an edge file without TensorFlow). This module exports and loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras import checks  # noqa: E402
from tlkeras.data.decoding import reference_decode  # noqa: E402
from tlkeras.exports import edge_runtime  # noqa: E402
from tlkeras.exports.edge_convert import Source, convert, load_source  # noqa: E402
from tlkeras.exports.edge_formats import (  # noqa: E402
    DEFAULT_CALIBRATION_SIZE,
    EXPORT_FORMATS,
    FORMATS,
    IO_TYPES,
    MODEL_FILES,
    ONNX_OPSET,
    OUTPUT,
    PARITY_TOLERANCE,
    QUANTIZATIONS,
    SAVED_MODEL,
    EdgeConfig,
    EdgeExportError,
    EdgeExportResult,
    parse_export_formats,
)
from tlkeras.exports.edge_verify import measure, verify_conversion  # noqa: E402
from tlkeras.exports.layout import LABELS_FILE, METADATA_FILE  # noqa: E402
from tlkeras.exports.signatures import FLOAT_INPUT  # noqa: E402

# The edge export's names, those of its parts included (``tlkeras.exports.edge`` is where callers
# import them from).
__all__ = [
    "DEFAULT_CALIBRATION_SIZE",
    "EXPORT_FORMATS",
    "FORMATS",
    "IO_TYPES",
    "MODEL_FILES",
    "ONNX_OPSET",
    "OUTPUT",
    "PARITY_TOLERANCE",
    "QUANTIZATIONS",
    "SAVED_MODEL",
    "EdgeConfig",
    "EdgeExportError",
    "EdgeExportResult",
    "export_edge",
    "export_onnx",
    "export_tflite",
    "is_edge_path",
    "load_edge_model",
    "measure",
    "parse_export_formats",
    "summary",
    "uses_delegates",
]


def export_edge(
    model_or_export_dir: Any,
    out_dir: str | Path,
    config: EdgeConfig | None = None,
    *,
    class_names: Sequence[str] | None = None,
    images: Any = None,
    labels: Sequence[int] | None = None,
    calibration_images: Any = None,
    overwrite: bool = False,
) -> EdgeExportResult:
    """Convert a tlkeras SavedModel version directory (or base directory: its highest version) or
    a Keras classifier to ``config`` in ``out_dir`` (see the module docstring for the files).

    ``images``: held-out images to verify on (encoded bytes or float pixels ``[N, H, W, 3]``
    0-255; synthetic ones when ``None``), ``labels`` their class indices for the accuracy.
    ``calibration_images``: the representative training images for ``int8`` (required there).
    ``out_dir`` appears complete or not at all.
    """
    config = config or EdgeConfig()
    checks.instance("config", config, EdgeConfig, "an EdgeConfig")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"out_dir: {str(out_dir)!r} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if config.quantization == "int8" and calibration_images is None:
        raise ValueError(
            "calibration_images: full int8 quantization expects a representative dataset drawn "
            "from the training images (--calibration_data), received none"
        )
    with tempfile.TemporaryDirectory(prefix="tlkeras-edge-") as work:
        source = load_source(model_or_export_dir, class_names, Path(work))
        pixels = _verification_pixels(source, images)
        if labels is not None and len(labels) != len(pixels):
            raise ValueError(
                f"labels: expected one per image ({len(pixels)}), received {len(labels)}"
            )
        calibration = (
            _pixels(calibration_images, source.image_size, "calibration_images")[
                : config.calibration_size
            ]
            if config.quantization == "int8"
            else None
        )
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.with_name(f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            model_file = tmp / MODEL_FILES[config.format]
            start = time.perf_counter()
            convert(source, config, calibration, model_file)
            convert_s = time.perf_counter() - start
            report, runtime = verify_conversion(
                source,
                config,
                model_file,
                pixels,
                labels,
                images_given=images is not None,
                work=Path(work),
            )
            size = model_file.stat().st_size
            (tmp / LABELS_FILE).write_text(
                "".join(f"{c}\n" for c in source.class_names), encoding="utf-8"
            )
            io = edge_runtime.describe(model_file)
            doc = _edge_metadata(source, config, io, runtime, size, convert_s, report, calibration)
            (tmp / METADATA_FILE).write_text(json.dumps(doc, indent=2), encoding="utf-8")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return EdgeExportResult(out_dir / MODEL_FILES[config.format], config, size, report)


def export_tflite(
    model_or_export_dir: Any,
    out_dir: str | Path,
    quantization: str = "none",
    *,
    io_type: str | None = None,
    **kwargs: Any,
) -> EdgeExportResult:
    """``export_edge`` to TFLite with ``quantization`` (``QUANTIZATIONS``) and, for int8, ``io_type``."""
    return export_edge(
        model_or_export_dir, out_dir, EdgeConfig("tflite", quantization, io_type), **kwargs
    )


def export_onnx(model_or_export_dir: Any, out_dir: str | Path, **kwargs: Any) -> EdgeExportResult:
    """``export_edge`` to ONNX (float32, opset ``ONNX_OPSET``, batch of any size)."""
    return export_edge(model_or_export_dir, out_dir, EdgeConfig("onnx"), **kwargs)


def _pixels(images: Any, size: tuple[int, int], what: str) -> np.ndarray:
    """``images`` (encoded bytes, or float pixels ``[N, H, W, 3]`` 0-255) as float32 pixels."""
    if isinstance(images, (np.ndarray, tf.Tensor)):
        x = np.asarray(images, dtype="float32")
        if x.ndim != 4 or tuple(x.shape[1:]) != (*size, 3):
            raise ValueError(
                f"{what}: expected pixels of shape (N, {size[0]}, {size[1]}, 3), received {x.shape}"
            )
        return x
    images = [bytes(b) for b in images]
    if not images:
        raise ValueError(f"{what}: expected at least one image, received none")
    return reference_decode(images, size)


def _verification_pixels(source: Source, images: Any) -> np.ndarray:
    if images is not None:
        return _pixels(images, source.image_size, "images")
    # No held-out images: parity on deterministic synthetic pixels (no accuracy then).
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (24, *source.image_size, 3)).astype("float32")


def _edge_metadata(
    source: Source,
    config: EdgeConfig,
    io: dict[str, Any],
    runtime: dict[str, Any],
    size: int,
    convert_s: float,
    report: dict[str, Any],
    calibration: np.ndarray | None,
) -> dict[str, Any]:
    keep = ("backbone", "backbone_preprocessing", "task", "model_name", "version", "strategy")
    return {
        **{k: source.metadata[k] for k in keep if k in source.metadata},
        "format": config.format,
        "file": MODEL_FILES[config.format],
        **asdict(config),
        "class_names": source.class_names,
        "num_classes": len(source.class_names),
        "input_size": list(source.image_size),
        "input": {
            "name": FLOAT_INPUT,
            "shape": [1 if config.format == "tflite" else None, *source.image_size, 3],
            **io,
        },
        "runtime": runtime,
        "output": {"name": OUTPUT, "shape": [None, len(source.class_names)]},
        "preprocessing": (
            "raw RGB pixels 0-255 (decoded, resized bilinear with antialias to input_size); the "
            "backbone's preprocessing is inside the model. Integer inputs: q = round(x / scale + "
            "zero_point)"
        ),
        "calibration_images": None if calibration is None else len(calibration),
        "size_bytes": size,
        "conversion_seconds": round(convert_s, 2),
        "verification": report,
    }


def load_edge_model(path: str | Path) -> edge_runtime.EdgeRunner:
    """An edge export: its ``.tflite``/``.onnx`` file, or the folder holding it; run as its
    verification ran (without delegates where the default ones failed on it)."""
    path = Path(path)
    if path.is_dir():
        files = [path / f for f in MODEL_FILES.values() if (path / f).is_file()]
        if not files:
            raise FileNotFoundError(
                f"model: expected a folder with {' or '.join(MODEL_FILES.values())}, "
                f"received {str(path)!r}"
            )
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"model: expected an existing file, received {str(path)!r}")
    return edge_runtime.EdgeRunner(path, delegates=uses_delegates(path))


def uses_delegates(path: str | Path) -> bool:
    """Whether the edge model at ``path`` runs with the runtime's default delegates: not where
    its verification found them failing (``metadata.json`` ``runtime.delegates: none``)."""
    meta = Path(path).parent / METADATA_FILE
    doc = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
    return doc.get("runtime", {}).get("delegates") != "none"


def is_edge_path(path: str | Path) -> bool:
    """Whether ``path`` names an edge export (a model file, or a folder holding one)."""
    path = Path(path)
    if path.suffix in (".tflite", ".onnx"):
        return True
    return path.is_dir() and any((path / f).is_file() for f in MODEL_FILES.values())


def summary(result: EdgeExportResult) -> str:
    """Two lines for a user: where, how big, how it compares with the SavedModel."""
    v = result.verification
    line = (
        f"exported {result.config.name} to {result.path} ({result.size_bytes / 1e6:.2f} MB)\n"
        f"verified in {v['runtime']} on {v['num_images']} {v['images']} images: top-1 agreement "
        f"{v['top1_agreement']:.1%}, max |probability difference| {v['max_abs_prob_diff']:.1e}, "
        f"{v['latency_ms_per_image']:.2f} ms/image"
    )
    if "accuracy" in v:
        line += (
            f", accuracy {v['accuracy']:.1%} (SavedModel {v['reference_accuracy']:.1%}, "
            f"{100 * v['accuracy_change']:+.1f} points)"
        )
    return line
