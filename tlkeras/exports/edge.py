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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.exports import edge_runtime  # noqa: E402
from tlkeras.exports.layout import (  # noqa: E402
    ASSETS_EXTRA,
    LABELS_FILE,
    METADATA_FILE,
    resolve_version_dir,
)
from tlkeras.exports.signatures import (  # noqa: E402
    FLOAT_INPUT,
    FLOAT_SIGNATURE,
    _resolve_head,
    input_size,
    reference_decode,
    write_serving_model,
)
from tlkeras.models.builder import get_spec  # noqa: E402

FORMATS = ("tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
IO_TYPES = ("float32", "uint8", "int8")
MODEL_FILES = {"tflite": "model.tflite", "onnx": "model.onnx"}
OUTPUT = "probabilities"
# A float conversion must match the SavedModel's probabilities to this and agree on every top-1.
PARITY_TOLERANCE = 1e-4
# Calibration images for full-integer quantization (the converter's own guidance: ~100-500).
DEFAULT_CALIBRATION_SIZE = 200
ONNX_OPSET = 17
# `--export_formats` names (``scripts/train.py``): the SavedModel plus every edge conversion.
SAVED_MODEL = "saved_model"


class EdgeExportError(ValueError):
    """A conversion that cannot be made or is refused; the message is one line for the user."""


@dataclass(frozen=True)
class EdgeConfig:
    """What to write: ``format`` (``FORMATS``), ``quantization`` (``QUANTIZATIONS``; TFLite only)
    and, for ``int8``, the interpreter's input/output type ``io_type`` (``IO_TYPES``; default
    uint8: raw pixels in, as a camera gives them). ``calibration_size`` caps the representative
    images used for ``int8``."""

    format: str = "tflite"
    quantization: str = "none"
    io_type: str | None = None
    calibration_size: int = DEFAULT_CALIBRATION_SIZE

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, received {self.format!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization: expected one of {QUANTIZATIONS}, received {self.quantization!r}"
            )
        if self.format == "onnx" and self.quantization != "none":
            raise ValueError(
                "quantization: the onnx format is written float32 only, expected 'none', "
                f"received {self.quantization!r}"
            )
        if self.io_type is None:
            object.__setattr__(
                self, "io_type", "uint8" if self.quantization == "int8" else "float32"
            )
        if self.io_type not in IO_TYPES:
            raise ValueError(f"io_type: expected one of {IO_TYPES}, received {self.io_type!r}")
        if self.io_type != "float32" and self.quantization != "int8":
            raise ValueError(
                f"io_type: {self.io_type!r} needs quantization='int8' (full integer), received "
                f"quantization={self.quantization!r}; expected io_type='float32'"
            )
        if isinstance(self.calibration_size, bool) or not (
            isinstance(self.calibration_size, int) and self.calibration_size >= 1
        ):
            raise ValueError(
                f"calibration_size: expected a positive int, received {self.calibration_size!r}"
            )

    @property
    def name(self) -> str:
        """The ``--export_formats`` name: ``tflite``, ``tflite_int8``, ``onnx``…"""
        if self.format == "onnx" or self.quantization == "none":
            return self.format
        return f"tflite_{self.quantization}"

    @property
    def is_float(self) -> bool:
        return self.quantization == "none"


# The `--export_formats` names, each an EdgeConfig with its defaults.
EXPORT_FORMATS: dict[str, EdgeConfig] = {
    c.name: c for c in [EdgeConfig("tflite", q) for q in QUANTIZATIONS] + [EdgeConfig("onnx")]
}


def parse_export_formats(names: Sequence[str]) -> tuple[bool, list[EdgeConfig]]:
    """``(write the SavedModel, edge configs)`` for ``names`` (``saved_model`` or ``EXPORT_FORMATS``)."""
    known = (SAVED_MODEL, *EXPORT_FORMATS)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"export_formats: expected a comma-separated list of {', '.join(known)}, received "
            f"{','.join(names) if names else 'nothing'}"
        )
    return SAVED_MODEL in names, [
        EXPORT_FORMATS[n] for n in dict.fromkeys(names) if n in EXPORT_FORMATS
    ]


@dataclass
class EdgeExportResult:
    path: Path  # the model file
    config: EdgeConfig
    size_bytes: int
    verification: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# The source: a SavedModel's float signature, its labels and what it was built from.


@dataclass
class _Source:
    float_fn: Any  # the loaded SavedModel's serving_float
    loaded: Any  # keeps the SavedModel's variables alive
    class_names: list[str]
    image_size: tuple[int, int]
    metadata: dict[str, Any]

    @property
    def backbone(self) -> str:
        return str(self.metadata.get("backbone") or "this model")

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.float_fn(**{FLOAT_INPUT: tf.constant(pixels, tf.float32)})[OUTPUT].numpy()


def _load_source(
    model_or_export_dir: Any, class_names: Sequence[str] | None, work: Path
) -> _Source:
    if isinstance(model_or_export_dir, (str, os.PathLike)):
        path = resolve_version_dir(model_or_export_dir)
        extra = path / ASSETS_EXTRA
        labels, meta = extra / LABELS_FILE, extra / METADATA_FILE
        metadata = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
        if not class_names and labels.is_file():
            class_names = labels.read_text(encoding="utf-8").splitlines()
        saved = path
    else:
        model = model_or_export_dir
        head = _resolve_head(model, None, None)
        if not class_names or len(class_names) != head.num_classes:
            raise ValueError(
                f"class_names: expected {head.num_classes} names for this {head.task} model, "
                f"received {list(class_names or [])}"
            )
        metadata = {"task": head.task, "input_size": list(input_size(model))}
        with contextlib.suppress(ValueError):
            metadata["backbone"] = get_spec(model).backbone
        saved = work / "savedmodel"
        write_serving_model(model, list(class_names), head, 1, str(saved))
    if not class_names:
        raise ValueError(
            f"class_names: expected them given or in {LABELS_FILE} of the export, received neither"
        )
    loaded = tf.saved_model.load(str(saved))
    float_fn = loaded.signatures[FLOAT_SIGNATURE]
    shape = float_fn.structured_input_signature[1][FLOAT_INPUT].shape
    return _Source(float_fn, loaded, list(class_names), (int(shape[1]), int(shape[2])), metadata)


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


# --------------------------------------------------------------------------------------------------
# Conversion.


def _probabilities_function(source: _Source, batch: int | None) -> Any:
    """The float signature reduced to its ``probabilities`` (class names travel in labels.txt)."""
    spec = tf.TensorSpec([batch, *source.image_size, 3], tf.float32, name=FLOAT_INPUT)

    @tf.function(input_signature=[spec], autograph=False)
    def probabilities(images):
        return {OUTPUT: source.float_fn(**{FLOAT_INPUT: images})[OUTPUT]}

    return probabilities


_TF_OP = re.compile(r"'(tf\.[A-Za-z0-9_]+)' op")


def _conversion_error(source: _Source, config: EdgeConfig, error: Exception) -> EdgeExportError:
    """One line naming the backbone, the format and what the converter refused."""
    text = str(error)
    ops = sorted(set(_TF_OP.findall(text)))
    if ops:
        why = (
            f"ops that are not TFLite builtins: {', '.join(ops)} (Flex/select TF ops are not "
            "used: most edge runtimes do not ship them)"
        )
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        why = (errors or lines or [type(error).__name__])[0]
        why = re.sub(r"^(?:\S+:\d+:\d+:\s*)?(?:error:\s*)?", "", why)[:300]
    return EdgeExportError(f"{source.backbone}: cannot convert to {config.name}: {why}")


@contextlib.contextmanager
def _converter_quiet() -> Iterator[None]:
    # The calibrator runs TF's deprecated tf.lite.Interpreter; its warning is not the user's concern.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        yield


def _convert_tflite(source: _Source, config: EdgeConfig, calibration: np.ndarray | None) -> bytes:
    fn = _probabilities_function(source, 1)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], source.loaded
    )
    # Builtins only: a model needing Flex (select TF) ops would not run on most edge runtimes.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if config.quantization != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if config.quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if config.quantization == "int8":

        def representative() -> Iterator[dict[str, np.ndarray]]:
            for x in calibration:
                yield {FLOAT_INPUT: x[None]}

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.as_dtype(config.io_type)
        converter.inference_output_type = tf.as_dtype(config.io_type)
    with _converter_quiet():
        return converter.convert()


class _Collect(logging.Handler):
    """Collects tf2onnx's "Unsupported ops: Counter({...})" as ``op (count)`` strings."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Unsupported ops:"):
            found = re.findall(r"'([^']+)': (\d+)", message)
            self.into.extend(f"{op} ({n}×)" for op, n in found)


def _convert_onnx(source: _Source, path: Path) -> None:
    try:
        import onnx
        import tf2onnx
    except ImportError as e:
        raise EdgeExportError(
            f"onnx: needs the tf2onnx and onnxruntime packages (pip install 'tlkeras[onnx]'): {e}"
        ) from e
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    # Frozen first (what tf2onnx does inside from_function, but there the SavedModel's captured
    # constants, e.g. EfficientNet's normalisation, stayed behind as extra graph inputs).
    frozen = convert_variables_to_constants_v2(
        _probabilities_function(source, None).get_concrete_function(), aggressive_inlining=True
    )
    names = {frozen.inputs[0].name: FLOAT_INPUT, frozen.outputs[0].name: OUTPUT}
    # tf2onnx logs the ops it cannot map and writes an invalid model anyway: collect and refuse.
    unsupported: list[str] = []
    handler = _Collect(unsupported)
    logger = logging.getLogger("tf2onnx")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        proto, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(),
            input_names=[frozen.inputs[0].name],
            output_names=[frozen.outputs[0].name],
            opset=ONNX_OPSET,
        )
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    if unsupported:
        raise EdgeExportError(
            f"{source.backbone}: cannot convert to onnx: tf2onnx {tf2onnx.__version__} has no "
            f"ONNX mapping for {', '.join(unsupported)}"
        )
    # The TF tensor names ("images:0", "Identity:0") become the contract's names.
    for value in [*proto.graph.input, *proto.graph.output]:
        value.name = names.get(value.name, value.name)
    for node in proto.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    onnx.save(proto, str(path))


# --------------------------------------------------------------------------------------------------
# Running an edge model: ``tlkeras.exports.edge_runtime`` (no TensorFlow), in a fresh process to verify.
# Why a fresh process: the converter's calibrator loads TensorFlow's own TFLite runtime, and LiteRT
# beside it in one process aborted (double free) while allocating a quantized model's tensors;
# and LiteRT's XNNPACK delegate aborts on some int8 files by itself (see the fallback below).


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
    source: _Source, config: EdgeConfig, model_file: Path, pixels: np.ndarray, work: Path
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


# --------------------------------------------------------------------------------------------------
# The export.


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
    if not isinstance(config, EdgeConfig):
        raise TypeError(f"config: expected an EdgeConfig, received {type(config).__name__}")
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
        source = _load_source(model_or_export_dir, class_names, Path(work))
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
            try:
                if config.format == "onnx":
                    _convert_onnx(source, model_file)
                else:
                    model_file.write_bytes(_convert_tflite(source, config, calibration))
            except EdgeExportError:
                raise
            except Exception as e:  # the converters raise anything from ConverterError to KeyError
                raise _conversion_error(source, config, e) from e
            convert_s = time.perf_counter() - start
            run, runtime = _run_verified(source, config, model_file, pixels, Path(work))
            report = measure(run["probabilities"], source.probabilities(pixels), labels)
            report["latency_ms_per_image"] = float(run["latency_ms"])
            report["runtime"] = edge_runtime.runtime_name(model_file)
            report["images"] = "given" if images is not None else "synthetic"
            _refuse_if_float_disagrees(source, config, report)
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


def _verification_pixels(source: _Source, images: Any) -> np.ndarray:
    if images is not None:
        return _pixels(images, source.image_size, "images")
    # No held-out images: parity on deterministic synthetic pixels (no accuracy then).
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (24, *source.image_size, 3)).astype("float32")


def _refuse_if_float_disagrees(source: _Source, config: EdgeConfig, report: dict) -> None:
    if not config.is_float:
        return
    if report["top1_agreement"] < 1.0 or report["max_abs_prob_diff"] > PARITY_TOLERANCE:
        raise EdgeExportError(
            f"{source.backbone}: the {config.name} conversion disagrees with the SavedModel "
            f"(top-1 agreement {report['top1_agreement']:.1%}, max |probability difference| "
            f"{report['max_abs_prob_diff']:.2e} > {PARITY_TOLERANCE:g} allowed); nothing written"
        )


def _edge_metadata(
    source: _Source,
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
