"""Loading and using an export: ``ExportedModel``, ``load_exported`` and predicting on image files.

The client side of a tlkeras export, for ``scripts/predict.py``, ``tlkeras.serving.app`` and
``tlkeras.workflows.training``: loads a version directory through ``tf.saved_model.load`` only (no Keras
model code runs), reads its labels and metadata, finds and reads image files, predicts through
``serving_default`` and formats the results and TensorFlow's errors. An edge export (``.tflite`` /
``.onnx``, ``tlkeras.exports.edge``) loads behind the same calls (``EdgeExportedModel``), so predict and
evaluate take either. ``load_keras_model`` reads a ``.keras`` model and its class names, for
``scripts/export.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import keras  # noqa: E402  isort: skip
import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.analysis.gradcam import overlay  # noqa: E402
from tlkeras.data.decoding import DEFAULT_TOP_K, MAX_IMAGE_BYTES, reference_decode  # noqa: E402
from tlkeras.exports.edge import is_edge_path, load_edge_model  # noqa: E402
from tlkeras.exports.edge_runtime import EdgeRunner  # noqa: E402
from tlkeras.exports.layout import (  # noqa: E402
    ASSETS_EXTRA,
    LABELS_FILE,
    METADATA_FILE,
    VERSION_RE,
    resolve_version_dir,
)
from tlkeras.exports.signatures import (  # noqa: E402
    BYTES_INPUT,
    BYTES_SIGNATURE,
    EXPLAIN_SIGNATURE,
    FLOAT_INPUT,
    FLOAT_SIGNATURE,
)
from tlkeras.models import builder as _model  # noqa: E402, F401  (registers tlkeras layers for loading)
from tlkeras.models.backbones import check_file  # noqa: E402

# Overlays (``explain_files``) keep the photo's own size up to this longest side: a 12-megapixel
# photo would make a ~20 MB PNG.
OVERLAY_MAX_SIDE = 1024
GRADCAM_SUFFIX = ".gradcam.png"


@dataclass
class ExportedModel:
    """A loaded SavedModel version with its labels and metadata."""

    path: Path
    version: int | None
    loaded: Any
    class_names: list[str]
    metadata: dict[str, Any]

    @property
    def signatures(self) -> dict[str, Any]:
        return dict(self.loaded.signatures)

    @property
    def input_size(self) -> tuple[int, int]:
        shape = self.signatures[FLOAT_SIGNATURE].structured_input_signature[1][FLOAT_INPUT].shape
        return int(shape[1]), int(shape[2])

    def predict_bytes(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        out = self.signatures[BYTES_SIGNATURE](
            **{BYTES_INPUT: tf.constant(list(images), tf.string)}
        )
        return {k: v.numpy() for k, v in out.items()}

    def predict_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        out = self.signatures[FLOAT_SIGNATURE](**{FLOAT_INPUT: tf.constant(pixels, tf.float32)})
        return {k: v.numpy() for k, v in out.items()}

    def explain_bytes(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        """Grad-CAM of each image's top class through the ``explain`` signature: ``heatmaps``
        float32 [N, H, W] in [0, 1] at the model's input size, ``classes`` (bytes) and ``scores``
        [N]. Exports have it only when written with ``explain=True``."""
        require_explain(self)
        signature = self.signatures[EXPLAIN_SIGNATURE]
        out = signature(**{BYTES_INPUT: tf.constant(list(images), tf.string)})
        return {k: v.numpy() for k, v in out.items()}


@dataclass
class EdgeExportedModel:
    """An edge export (``tlkeras.exports.edge``) behind the same calls as ``ExportedModel``: bytes are
    decoded as the serving graph decodes them, the file runs in LiteRT or onnxruntime."""

    path: Path
    runner: EdgeRunner
    class_names: list[str]
    metadata: dict[str, Any]
    version: int | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        return self.runner.image_size

    def predict_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        probabilities = self.runner.predict(pixels)
        k = min(DEFAULT_TOP_K, probabilities.shape[-1])
        indices = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
        names = np.array([c.encode("utf-8") for c in self.class_names], dtype=object)
        return {
            "probabilities": probabilities,
            "classes": names[indices],
            "scores": np.take_along_axis(probabilities, indices, axis=-1),
        }

    def predict_bytes(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        return self.predict_pixels(reference_decode(list(images), self.input_size))

    def explain_bytes(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        raise _edge_cannot_explain(self.path)


def _edge_cannot_explain(path: Path) -> ValueError:
    return ValueError(
        f"explain: expected a SavedModel exported with explain=True, received the edge export "
        f"{str(path)!r} (TFLite/ONNX files carry no gradients)"
    )


def require_explain(model: Any) -> None:
    """A one-line ``ValueError`` unless ``model`` (an export, or a wrapper forwarding to one) has
    the ``explain`` signature, which ``tlkeras.export(explain=True)`` adds."""
    signatures = getattr(model, "signatures", None)
    if signatures is None:
        raise _edge_cannot_explain(model.path)
    if EXPLAIN_SIGNATURE not in signatures:
        raise ValueError(
            f"explain: expected an export with an {EXPLAIN_SIGNATURE!r} signature, received "
            f"{str(model.path)!r} without one; re-export with explain=True "
            "(scripts/export.py --explain)"
        )


def _load_edge(path: Path) -> EdgeExportedModel:
    runner = load_edge_model(path)
    labels, meta = runner.path.parent / LABELS_FILE, runner.path.parent / METADATA_FILE
    if not labels.is_file():
        raise FileNotFoundError(
            f"model: expected {LABELS_FILE} beside {str(runner.path)!r} (written by tlkeras's "
            "edge export), found none"
        )
    return EdgeExportedModel(
        path=runner.path,
        runner=runner,
        class_names=labels.read_text(encoding="utf-8").splitlines(),
        metadata=json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {},
    )


def load_exported(
    path_or_base: str | Path, version: int | None = None
) -> ExportedModel | EdgeExportedModel:
    """Load a version directory, or the highest (or given) version under a base directory; or an
    edge export (a ``.tflite``/``.onnx`` file or the folder holding it)."""
    if is_edge_path(path_or_base):
        return _load_edge(Path(path_or_base))
    path = resolve_version_dir(path_or_base, version)
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, tf.errors.OpError) as e:
        raise ValueError(f"model path: could not load a SavedModel from {str(path)!r}: {e}") from e
    extra = path / ASSETS_EXTRA
    labels = extra / LABELS_FILE
    meta = extra / METADATA_FILE
    return ExportedModel(
        path=path,
        version=int(path.name) if VERSION_RE.match(path.name) else None,
        loaded=loaded,
        class_names=labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else [],
        metadata=json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {},
    )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus image files (by suffix, not hidden) found under named folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                f
                for f in sorted(p.rglob("*"))
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(
                f"image path: expected an existing file or folder, received {str(p)!r}"
            )
    return out


def read_images(paths: Sequence[str | Path], *, limit: int | None = None) -> list[bytes]:
    """Encoded bytes of the image files in ``paths`` (see ``image_files``), at most ``limit``."""
    files = image_files(paths)[:limit]
    if not files:
        raise ValueError(f"images: expected image files, found none in {[str(p) for p in paths]}")
    return [f.read_bytes() for f in files]


def predict_files(
    model: ExportedModel,
    paths: Sequence[str | Path],
    *,
    top_k: int | None = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Top-k predictions for image files/folders through ``serving_default``.

    A file that cannot be used gets ``{"path", "error"}`` instead of failing the others.
    """
    files = image_files(paths)
    if not files:
        raise ValueError(f"images: expected image files, found none in {[str(p) for p in paths]}")
    results: dict[int, dict[str, Any]] = {}
    pending: list[tuple[int, bytes]] = []
    for i, f in enumerate(files):
        size = f.stat().st_size
        if size > MAX_IMAGE_BYTES:
            results[i] = {"path": str(f), "error": f"file is larger than {MAX_IMAGE_BYTES} bytes"}
        else:
            pending.append((i, f.read_bytes()))

    def run(batch: list[tuple[int, bytes]]) -> None:
        try:
            out = model.predict_bytes([b for _, b in batch])
        except tf.errors.InvalidArgumentError as e:
            if len(batch) > 1:  # find the bad file(s): one at a time
                for item in batch:
                    run([item])
                return
            results[batch[0][0]] = {"path": str(files[batch[0][0]]), "error": tf_error_message(e)}
            return
        for row, (i, _) in enumerate(batch):
            k = len(out["classes"][row]) if top_k is None else min(top_k, len(out["classes"][row]))
            results[i] = {
                "path": str(files[i]),
                "classes": [c.decode("utf-8") for c in out["classes"][row][:k]],
                "scores": [float(s) for s in out["scores"][row][:k]],
            }

    for start in range(0, len(pending), batch_size):
        run(pending[start : start + batch_size])
    return [results[i] for i in range(len(files))]


def _overlay_paths(files: Sequence[Path], out_dir: Path) -> list[Path]:
    """``out_dir/<stem>.gradcam.png`` per file; ``<stem>-2``, ``-3``… where stems repeat
    (``a/photo.jpg`` and ``b/photo.png``), so no overlay overwrites another of the same run."""
    seen: dict[str, int] = {}
    out = []
    for f in files:
        n = seen[f.stem] = seen.get(f.stem, 0) + 1
        out.append(out_dir / f"{f.stem if n == 1 else f'{f.stem}-{n}'}{GRADCAM_SUFFIX}")
    return out


def _original_pixels(data: bytes) -> np.ndarray:
    """The photo as decoded for the model (first GIF frame, RGB), at its own size capped at
    ``OVERLAY_MAX_SIDE``."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    h, w = int(image.shape[0]), int(image.shape[1])
    scale = OVERLAY_MAX_SIDE / max(h, w)
    if scale < 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = tf.image.resize(image, size, "bilinear", antialias=True)
    return np.asarray(image, dtype=np.float32)


def explain_files(
    model: ExportedModel,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """Grad-CAM overlays of image files through the ``explain`` signature, one PNG each.

    Each heat map is stretched back over the photo at its own size (capped at
    ``OVERLAY_MAX_SIDE``), as the serving graph stretched the photo to the input size, and
    written to ``out_dir/<stem>.gradcam.png`` (``_overlay_paths``). Returns, by file path as
    given, ``{"png", "class", "score"}`` (the class explained, its probability) or ``{"error"}``.
    """
    from PIL import Image

    require_explain(model)
    files = [Path(p) for p in paths]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = _overlay_paths(files, out_dir)
    results: dict[str, dict[str, Any]] = {}

    def run(batch: list[int]) -> None:
        data = [files[i].read_bytes() for i in batch]
        try:
            out = model.explain_bytes(data)
        except tf.errors.InvalidArgumentError as e:
            if len(batch) > 1:  # find the bad file(s): one at a time
                for i in batch:
                    run([i])
                return
            results[str(files[batch[0]])] = {"error": tf_error_message(e)}
            return
        for row, i in enumerate(batch):
            pixels = _original_pixels(data[row])
            Image.fromarray(overlay(pixels, out["heatmaps"][row])).save(targets[i])
            results[str(files[i])] = {
                "png": str(targets[i]),
                "class": out["classes"][row].decode("utf-8"),
                "score": float(out["scores"][row]),
            }

    for start in range(0, len(files), batch_size):
        run(list(range(start, min(start + batch_size, len(files)))))
    return results


def tf_error_message(error: Exception) -> str:
    """The user-facing line of a TensorFlow runtime error, without graph node names and traces."""
    message = getattr(error, "message", None) or str(error)
    noise = ("Graph execution error", "Detected at node", "<stack traces", "Traceback")
    kept = [
        line
        for line in message.splitlines()
        if line.strip() and not line[0].isspace() and not line.startswith(noise)
    ]
    text = " ".join(kept) or message
    text = re.sub(r"\{\{function_node [^}]*\}\}|\[\[\{\{node [^\]]*\]\]|\[Op:[^\]]*\]", "", text)
    return " ".join(text.split()) or type(error).__name__


def format_predictions(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: one block per image, one line per class."""
    lines = []
    for r in results:
        lines.append(r["path"])
        if "error" in r:
            lines.append(f"  error: {r['error']}")
            continue
        width = max(len(c) for c in r["classes"])
        lines.extend(
            f"  {c:<{width}}  {s:.4f}" for c, s in zip(r["classes"], r["scores"], strict=True)
        )
        if "gradcam" in r:  # scripts/predict.py --explain
            g = r["gradcam"]
            lines.append(
                f"  gradcam: {g['png']} ({g['class']})"
                if "png" in g
                else f"  gradcam error: {g['error']}"
            )
    return "\n".join(lines)


def load_keras_model(path: str | Path, class_names: Sequence[str] | None = None):
    """A ``.keras`` model (Keras ``safe_mode``) and its class names, for exporting.

    ``path`` is a ``.keras`` file or a training run directory holding ``model.keras``; class names
    default to the ``class_names`` of a ``metrics.json`` beside it.
    """
    path = Path(path)
    file = path / "model.keras" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".keras":
        raise FileNotFoundError(
            f"--model: expected a .keras file or a run directory with model.keras, received {str(path)!r}"
        )
    # Keras answers "File not found" for a file that is there but is not a zip archive.
    check_file(file, "model", "copy or save it again")
    model = keras.saving.load_model(file, compile=False, safe_mode=True)
    if not class_names:
        metrics = file.parent / "metrics.json"
        if metrics.is_file():
            class_names = json.loads(metrics.read_text(encoding="utf-8")).get("class_names")
    if not class_names:
        raise ValueError(
            f"class names: expected --class_names or a metrics.json with class_names beside "
            f"{str(file)!r}, received neither"
        )
    return model, list(class_names)
