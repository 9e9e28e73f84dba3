"""Converting a tlkeras SavedModel's float signature to TFLite (with its quantizations) or ONNX.

The source (``Source``, ``load_source``) is a SavedModel's ``serving_float`` signature, its labels
and what it was built from; a Keras model is first written to a temporary SavedModel. ``convert``
writes one ``EdgeConfig`` of it: TFLite from the concrete function, builtin ops only (float32,
float16 weights, dynamic-range or full-integer int8 calibrated on representative images); ONNX
through tf2onnx from the frozen graph, refused when tf2onnx cannot map an op. Any converter failure
becomes one ``EdgeExportError`` line naming the backbone, the format and what was refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.exports.edge_formats import ONNX_OPSET, OUTPUT, EdgeConfig, EdgeExportError  # noqa: E402
from tlkeras.exports.layout import (  # noqa: E402
    ASSETS_EXTRA,
    LABELS_FILE,
    METADATA_FILE,
    resolve_version_dir,
)
from tlkeras.exports.signatures import (  # noqa: E402
    FLOAT_INPUT,
    FLOAT_SIGNATURE,
    input_size,
    resolve_head,
    write_serving_model,
)
from tlkeras.models.builder import get_spec  # noqa: E402

# --------------------------------------------------------------------------------------------------
# The source: a SavedModel's float signature, its labels and what it was built from.


@dataclass
class Source:
    """What an edge conversion starts from (``load_source``)."""

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


def load_source(model_or_export_dir: Any, class_names: Sequence[str] | None, work: Path) -> Source:
    """The SavedModel at ``model_or_export_dir`` (a version or base directory), or a Keras model
    written to one in ``work``, with its class names (given, else its labels) and metadata."""
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
        head = resolve_head(model, None, None)
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
    return Source(float_fn, loaded, list(class_names), (int(shape[1]), int(shape[2])), metadata)


# --------------------------------------------------------------------------------------------------
# Conversion.


def convert(
    source: Source, config: EdgeConfig, calibration: np.ndarray | None, model_file: Path
) -> None:
    """Write ``source`` converted to ``config`` at ``model_file``; whatever a converter raises
    comes back as one ``EdgeExportError`` line (``_conversion_error``)."""
    try:
        if config.format == "onnx":
            _convert_onnx(source, model_file)
        else:
            model_file.write_bytes(_convert_tflite(source, config, calibration))
    except EdgeExportError:
        raise
    except Exception as e:  # the converters raise anything from ConverterError to KeyError
        raise _conversion_error(source, config, e) from e


def _probabilities_function(source: Source, batch: int | None) -> Any:
    """The float signature reduced to its ``probabilities`` (class names travel in labels.txt)."""
    spec = tf.TensorSpec([batch, *source.image_size, 3], tf.float32, name=FLOAT_INPUT)

    @tf.function(input_signature=[spec], autograph=False)
    def probabilities(images):
        return {OUTPUT: source.float_fn(**{FLOAT_INPUT: images})[OUTPUT]}

    return probabilities


_TF_OP = re.compile(r"'(tf\.[A-Za-z0-9_]+)' op")


def _conversion_error(source: Source, config: EdgeConfig, error: Exception) -> EdgeExportError:
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


def _convert_tflite(source: Source, config: EdgeConfig, calibration: np.ndarray | None) -> bytes:
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


def _convert_onnx(source: Source, path: Path) -> None:
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
