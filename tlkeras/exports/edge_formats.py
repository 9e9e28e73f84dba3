"""What an edge export writes: the formats, quantizations and interface types, one ``EdgeConfig``
each, the ``--export_formats`` names, and the result of an export (``tlkeras.exports.edge``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlkeras import checks

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
    # metadata: the options as scripts/export.py shows them (tlkeras.cli.define_config_flags).
    quantization: str = field(
        default="none",
        metadata={
            "help": "TFLite: none (float32) | float16 | dynamic (int8 weights) | int8 (full "
            "integer; needs --calibration_data).",
            "choices": QUANTIZATIONS,
        },
    )
    io_type: str | None = field(
        default=None,
        metadata={"help": "int8: the input/output type (default uint8).", "choices": IO_TYPES},
    )
    calibration_size: int = DEFAULT_CALIBRATION_SIZE

    def __post_init__(self) -> None:
        checks.choice("format", self.format, FORMATS, as_repr=True)
        checks.choice("quantization", self.quantization, QUANTIZATIONS, as_repr=True)
        if self.format == "onnx" and self.quantization != "none":
            raise ValueError(
                "quantization: the onnx format is written float32 only, expected 'none', "
                f"received {self.quantization!r}"
            )
        if self.io_type is None:
            object.__setattr__(
                self, "io_type", "uint8" if self.quantization == "int8" else "float32"
            )
        checks.choice("io_type", self.io_type, IO_TYPES, as_repr=True)
        if self.io_type != "float32" and self.quantization != "int8":
            raise ValueError(
                f"io_type: {self.io_type!r} needs quantization='int8' (full integer), received "
                f"quantization={self.quantization!r}; expected io_type='float32'"
            )
        checks.positive_int("calibration_size", self.calibration_size)

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
