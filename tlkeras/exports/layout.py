"""The on-disk layout of a tlkeras export (TF Serving's ``model_base_path/<version>/``)::

    <base_dir>/<model_name>/<version>/
        saved_model.pb, variables/          the graph and weights (``signatures.write_serving_model``)
        assets.extra/labels.txt             one class name a line, in output order
        assets.extra/metadata.json          how the model was built, trained and exported
        assets.extra/tf_serving_warmup_requests   PredictionLog TFRecords TF Serving replays at load

Edge exports (``tlkeras.exports.edge``) of a version sit beside the versions, in a folder TF Serving does
not read (it only loads numeric subdirectories)::

    <base_dir>/<model_name>/edge/<version>/<format>/   model.tflite | model.onnx, labels.txt,
                                                     metadata.json

``assets.extra/`` is TF Serving's conventional place for files it should not treat as model assets
(it reads only the warmup file from it). Owns the file names, version numbering and resolving a
path to a version directory; shared by the writer (``tlkeras.exports.savedmodel``), the verifier
(``tlkeras.exports.verify``) and the loader (``tlkeras.exports.loading``). No TensorFlow.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_BASE_DIR = "saved_models"
ASSETS_EXTRA = "assets.extra"
LABELS_FILE = "labels.txt"
METADATA_FILE = "metadata.json"
WARMUP_FILE = "tf_serving_warmup_requests"
VERSION_RE = re.compile(r"^[0-9]+$")
EDGE_DIR = "edge"


def complete_versions(model_dir: Path) -> list[int]:
    """Version numbers under ``model_dir`` whose folder holds ``saved_model.pb``, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if VERSION_RE.match(p.name) and (p / "saved_model.pb").is_file()
    )


def next_version(base_dir: str | Path, model_name: str) -> int:
    """The next free version number under ``base_dir/model_name`` (1 for a new model)."""
    model_dir = Path(base_dir) / model_name
    taken = (
        [int(p.name) for p in model_dir.iterdir() if VERSION_RE.match(p.name)]
        if (model_dir.is_dir())
        else []
    )
    return max(taken, default=0) + 1


def resolve_version_dir(path_or_base: str | Path, version: int | None = None) -> Path:
    """A version directory: ``path_or_base`` itself, its ``version``, or its highest version."""
    path = Path(path_or_base)
    if not path.exists():
        raise FileNotFoundError(
            f"model path: expected an existing directory, received {str(path)!r}"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"model path: expected a directory, received file {str(path)!r}")
    if version is None and (path / "saved_model.pb").is_file():
        return path
    versions = complete_versions(path)
    if version is not None:
        if version not in versions:
            raise ValueError(
                f"version: expected one of {versions} under {str(path)!r}, received {version}"
            )
        return path / str(version)
    if not versions:
        raise ValueError(
            f"model path: expected a SavedModel directory or a base directory with numeric "
            f"version subdirectories, received {str(path)!r}"
        )
    return path / str(versions[-1])


def next_edge_version(base_dir: str | Path, model_name: str) -> int:
    """The next number free both as a SavedModel version and among the edge exports (for edge
    exports written without a SavedModel)."""
    root = Path(base_dir) / model_name / EDGE_DIR
    taken = (
        [int(p.name) for p in root.iterdir() if VERSION_RE.match(p.name)] if root.is_dir() else []
    )
    return max([next_version(base_dir, model_name) - 1, *taken]) + 1


def edge_dir(base_dir: str | Path, model_name: str, version: int, name: str) -> Path:
    """Where the edge export ``name`` (``tflite_int8``…) of ``version`` goes."""
    return Path(base_dir) / model_name / EDGE_DIR / str(version) / name
