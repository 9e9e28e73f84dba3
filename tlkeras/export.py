"""Export a Keras classifier as a SavedModel that TensorFlow Serving serves unchanged.

Layout (TF Serving's ``model_base_path/<version>/``)::

    <base_dir>/<model_name>/<version>/
        saved_model.pb, variables/          the graph and weights (Keras ``ExportArchive``)
        assets.extra/labels.txt             one class name a line, in output order
        assets.extra/metadata.json          how the model was built, trained and exported
        assets.extra/tf_serving_warmup_requests   PredictionLog TFRecords TF Serving replays at load

``assets.extra/`` is TF Serving's conventional place for files it should not treat as model assets
(it reads only the warmup file from it).

Signatures:

- ``serving_default``: ``image_bytes`` tf.string [None] encoded JPEG/PNG/GIF/BMP/WebP, decoded by real
  format, resized exactly as the training pipeline does, then the Keras model (preprocessing inside).
  Byte-size and declared-pixel caps are checked in the graph before decoding.
- ``serving_float``: ``images`` float32 [None, H, W, 3] raw RGB pixels 0–255.

Both return ``probabilities`` float32 [None, C], ``classes`` string [None, k] and ``scores``
float32 [None, k] (top-k by score). A version directory is written to a hidden temporary sibling,
verified in a fresh process and only then renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

DEFAULT_BASE_DIR = "saved_models"
BYTES_SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "serving_float"
SIGNATURES = (BYTES_SIGNATURE, FLOAT_SIGNATURE)
BYTES_INPUT = "image_bytes"
FLOAT_INPUT = "images"
OUTPUTS = ("probabilities", "classes", "scores")
ASSETS_EXTRA = "assets.extra"
LABELS_FILE = "labels.txt"
METADATA_FILE = "metadata.json"
WARMUP_FILE = "tf_serving_warmup_requests"
TASKS = ("multiclass", "binary", "multilabel")
DEFAULT_TOP_K = 5
# Caps on one encoded image in the bytes signature (the pixel cap is the training scan's default).
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
FLOAT_TOLERANCE = 1e-5
# The bytes signature decodes in the graph and the reference eagerly, with the same function; both
# then run the same model, so they agree up to float rounding.
BYTES_TOLERANCE = 1e-4
_TMP_PREFIX = ".tmp-export-"
_VERSION_RE = re.compile(r"^[0-9]+$")


class ExportVerificationError(RuntimeError):
    """The reloaded SavedModel does not match the in-memory Keras model."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    version: int
    model_name: str
    signatures: tuple[str, ...]
    verification: dict[str, Any] | None = field(default=None, compare=False)


# --------------------------------------------------------------------------------------------------
# Decoding: one implementation for the training pipeline's reference and the serving graph.


def _declared_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width × height an encoded image declares in its header (0 for unknown formats), int64.

    Read before decoding so a decompression bomb (a tiny file declaring a huge canvas) is refused
    without allocating it. JPEG via TF's own SOF parser; the other formats' headers are fixed
    offsets (PNG IHDR, GIF logical screen, BMP info header, WebP VP8/VP8L/VP8X).
    """
    head = tf.strings.substr(tf.strings.join([data, tf.constant(b"\0" * 32)]), 0, 32)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
    shr, band = tf.bitwise.right_shift, tf.bitwise.bitwise_and

    def le(i, n):
        return sum(b[i + j] * 2 ** (8 * j) for j in range(n))

    def be32(i):
        return b[i] * 2**24 + b[i + 1] * 2**16 + b[i + 2] * 2**8 + b[i + 3]

    def bmp():  # height is negative for top-down bitmaps
        w, h = le(18, 4), le(22, 4)
        return tf.abs(tf.where(w >= 2**31, w - 2**32, w)) * tf.abs(
            tf.where(h >= 2**31, h - 2**32, h)
        )

    def webp():
        chunk = tf.strings.substr(head, 12, 4)
        vp8 = band(le(26, 2), 0x3FFF) * band(le(28, 2), 0x3FFF)
        lossless = (1 + band(le(21, 2), 0x3FFF)) * (1 + band(shr(le(22, 4), 6), 0x3FFF))
        extended = (1 + le(24, 3)) * (1 + le(27, 3))
        return tf.case(
            [
                (tf.equal(chunk, b"VP8 "), lambda: vp8),
                (tf.equal(chunk, b"VP8L"), lambda: lossless),
                (tf.equal(chunk, b"VP8X"), lambda: extended),
            ],
            default=lambda: tf.constant(0, tf.int64),
        )

    def jpeg():
        return tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64))

    def starts(prefix: bytes, at: int = 0) -> tf.Tensor:
        return tf.equal(tf.strings.substr(head, at, len(prefix)), prefix)

    return tf.case(
        [
            (starts(b"\xff\xd8"), jpeg),
            (starts(b"\x89PNG"), lambda: be32(16) * be32(20)),
            (starts(b"GIF"), lambda: le(6, 2) * le(8, 2)),
            (starts(b"BM"), bmp),
            (tf.logical_and(starts(b"RIFF"), starts(b"WEBP", 8)), webp),
        ],
        default=lambda: tf.constant(0, tf.int64),
        exclusive=False,
    )


def decode_and_resize(
    data: tf.Tensor,
    image_size: tuple[int, int],
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tf.Tensor:
    """One encoded image (scalar tf.string) → float32 [H, W, 3] RGB pixels 0–255, graph-safe.

    The byte and declared-pixel caps are checked first; the decoding and resizing are the training
    pipeline's own (``tlkeras.data.decode_image``), so served and trained pixels are identical.
    """
    from tlkeras.data import decode_image

    size = tf.strings.length(data)
    checks = [
        tf.debugging.Assert(size > 0, ["image is empty (0 bytes)"]),
        tf.debugging.Assert(size <= max_bytes, [f"image is larger than {max_bytes} bytes"]),
    ]
    with tf.control_dependencies(checks):
        pixels = _declared_pixels(data)
    cap = tf.debugging.Assert(
        pixels <= max_pixels, [f"image declares more than {max_pixels} pixels"]
    )
    with tf.control_dependencies([cap]):
        data = tf.identity(data)
    return tf.cast(decode_image(data, image_size), tf.float32)


def _decode_batch(images: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    return tf.map_fn(
        lambda x: decode_and_resize(x, image_size),
        images,
        fn_output_signature=tf.TensorSpec([*image_size, 3], tf.float32),
    )


def _reference_decode(images: Sequence[bytes], image_size: tuple[int, int]) -> np.ndarray:
    """The training pipeline's decoding of ``images``, eagerly: float32 [N, H, W, 3]."""
    return np.stack([decode_and_resize(tf.constant(b), image_size).numpy() for b in images]).astype(
        "float32"
    )


# --------------------------------------------------------------------------------------------------
# What the model's output means.


@dataclass(frozen=True)
class _Head:
    task: str
    from_logits: bool
    units: int

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, received {self.task!r}")
        if self.task == "binary" and self.units != 1:
            raise ValueError(
                f"task 'binary': expected a model with one sigmoid output unit, received "
                f"{self.units} units (use task='multiclass' for a 2-unit softmax)"
            )

    @property
    def num_classes(self) -> int:
        return 2 if self.task == "binary" else self.units

    def probabilities(self, y: tf.Tensor) -> tf.Tensor:
        y = tf.cast(y, tf.float32)
        if self.task == "multiclass":
            return tf.nn.softmax(y, axis=-1) if self.from_logits else y
        p = tf.sigmoid(y) if self.from_logits else y
        return tf.concat([1.0 - p, p], axis=-1) if self.task == "binary" else p


def _output_layer(model: Any):
    try:
        return model.get_layer("predictions")
    except ValueError:
        return model.outputs[0]._keras_history.operation


def _resolve_head(model: Any, task: str | None, from_logits: bool | None) -> _Head:
    if len(model.outputs) != 1:
        raise ValueError(f"expected a model with one output, received {len(model.outputs)}")
    units = int(model.outputs[0].shape[-1])
    spec_head = None
    try:
        from tlkeras.model import get_spec

        spec_head = get_spec(model).head
    except (ImportError, ValueError):
        pass
    if spec_head is not None:
        task = spec_head.task if task is None else task
        from_logits = spec_head.from_logits if from_logits is None else from_logits
    if task is None or from_logits is None:
        activation = getattr(_output_layer(model), "activation", None)
        act = getattr(activation, "__name__", None)
        if from_logits is None:
            from_logits = act in (None, "linear")
        if task is None:
            task = "binary" if units == 1 else ("multilabel" if act == "sigmoid" else "multiclass")
    return _Head(task=task, from_logits=bool(from_logits), units=units)


def _input_size(model: Any) -> tuple[int, int]:
    if len(model.inputs) != 1:
        raise ValueError(f"expected a model with one image input, received {len(model.inputs)}")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[2] is None:
        raise ValueError(
            f"expected a model input of shape (None, H, W, 3) with H and W fixed, received {shape}"
        )
    return int(shape[1]), int(shape[2])


# --------------------------------------------------------------------------------------------------
# Versions and directories.


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if _VERSION_RE.match(p.name) and (p / "saved_model.pb").is_file()
    )


def next_version(base_dir: str | Path, model_name: str) -> int:
    """The next free version number under ``base_dir/model_name`` (1 for a new model)."""
    model_dir = Path(base_dir) / model_name
    taken = (
        [int(p.name) for p in model_dir.iterdir() if _VERSION_RE.match(p.name)]
        if (model_dir.is_dir())
        else []
    )
    return max(taken, default=0) + 1


def _check_model_name(model_name: str) -> None:
    if not isinstance(model_name, str) or not re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name
    ):
        raise ValueError(
            "model_name: expected letters, digits, '_', '.' or '-' (TF Serving's URL path "
            f"segment), received {model_name!r}"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(model_dir: Path) -> None:
    """Delete half-written exports left by processes that died (their pid is in the name)."""
    if not model_dir.is_dir():
        return
    for p in model_dir.glob(f"{_TMP_PREFIX}*"):
        m = re.match(rf"{re.escape(_TMP_PREFIX)}(\d+)-", p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


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
    versions = _versions(path)
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


# --------------------------------------------------------------------------------------------------
# TF Serving warmup records, without the tensorflow-serving-api package: the four messages TF Serving
# reads are declared here with the field numbers of tensorflow_serving/apis/{prediction_log,predict,
# model}.proto (fields we do not set are left out, which is wire-compatible).


@functools.cache
def _warmup_classes():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from tensorflow.core.framework import tensor_pb2

    pool = descriptor_pool.DescriptorPool()

    def add(file_descriptor):
        for dep in file_descriptor.dependencies:
            add(dep)
        try:
            pool.FindFileByName(file_descriptor.name)
        except KeyError:
            proto = descriptor_pb2.FileDescriptorProto()
            file_descriptor.CopyToProto(proto)
            pool.Add(proto)

    add(tensor_pb2.DESCRIPTOR)
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tlkeras/tf_serving_prediction_log.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=[tensor_pb2.DESCRIPTOR.name],
    )

    def msg(name, *fields, nested=()):
        m = fdp.message_type.add(name=name)
        for n in nested:
            m.nested_type.add().CopyFrom(n)
        for fname, number, ftype, type_name, label in fields:
            m.field.add(name=fname, number=number, type=ftype, type_name=type_name, label=label)
        return m

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg(
        "ModelSpec",
        ("name", 1, F.TYPE_STRING, None, opt),
        ("signature_name", 3, F.TYPE_STRING, None, opt),
    )
    entry = descriptor_pb2.DescriptorProto(name="InputsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(
        name="value", number=2, type=F.TYPE_MESSAGE, type_name=".tensorflow.TensorProto", label=opt
    )
    msg(
        "PredictRequest",
        ("model_spec", 1, F.TYPE_MESSAGE, ".tensorflow.serving.ModelSpec", opt),
        ("inputs", 2, F.TYPE_MESSAGE, ".tensorflow.serving.PredictRequest.InputsEntry", rep),
        nested=[entry],
    )
    msg("PredictLog", ("request", 1, F.TYPE_MESSAGE, ".tensorflow.serving.PredictRequest", opt))
    msg("PredictionLog", ("predict_log", 6, F.TYPE_MESSAGE, ".tensorflow.serving.PredictLog", opt))
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.PredictionLog")
    )


def write_warmup_requests(path: str | Path, model_name: str, images: Sequence[bytes]) -> Path:
    """Write one PredictionLog TFRecord per image for ``serving_default`` (TF Serving's warmup)."""
    PredictionLog = _warmup_classes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image in images:
            log = PredictionLog()
            request = log.predict_log.request
            request.model_spec.name = model_name
            request.model_spec.signature_name = BYTES_SIGNATURE
            # The private pool has its own TensorProto class: copy through the wire format.
            tensor = tf.make_tensor_proto([image], dtype=tf.string)
            request.inputs[BYTES_INPUT].ParseFromString(tensor.SerializeToString())
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(path: str | Path) -> list[Any]:
    """Parse a warmup file back into PredictionLog messages (for checks and tests)."""
    PredictionLog = _warmup_classes()
    return [PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


# --------------------------------------------------------------------------------------------------
# Building the archive.


def sample_images(image_size: tuple[int, int] = (48, 64), n: int = 3, seed: int = 0) -> list[bytes]:
    """Deterministic synthetic JPEG/PNG images for verification and warmup when none are given."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    out = []
    for i in range(n):
        # Smooth gradients plus noise: JPEG-friendly, and not all one class by construction.
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 40.0 * i)], axis=-1)
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype("uint8")
        enc = tf.io.encode_jpeg if i % 2 == 0 else tf.io.encode_png
        out.append(enc(img).numpy())
    return out


def _versions_info() -> dict[str, str]:
    import importlib.metadata

    import keras

    try:
        tlk = importlib.metadata.version("tlkeras")
    except importlib.metadata.PackageNotFoundError:
        tlk = "unknown"
    return {"tlkeras": tlk, "keras": keras.__version__, "tensorflow": tf.__version__}


def _spec_metadata(model: Any) -> dict[str, Any]:
    try:
        from tlkeras.backbones import get_backbone
        from tlkeras.model import get_spec

        spec = get_spec(model)
    except (ImportError, ValueError):
        return {}
    out = {
        "backbone": spec.backbone,
        "strategy": spec.strategy,
        "fine_tune_at": spec.fine_tune_at,
        "spec": spec.to_dict(),
    }
    with contextlib.suppress(ValueError, AttributeError):
        out["backbone_preprocessing"] = get_backbone(spec.backbone).preprocess_mode
    return out


def _build_archive(model: Any, class_names: Sequence[str], head: _Head, top_k: int):
    import keras

    size = _input_size(model)
    k = min(top_k, head.num_classes)
    names = tf.constant(list(class_names), dtype=tf.string)

    def outputs(pixels):
        probabilities = head.probabilities(model(pixels, training=False))
        scores, indices = tf.math.top_k(probabilities, k=k)
        return {
            "probabilities": probabilities,
            "classes": tf.gather(names, indices),
            "scores": scores,
        }

    def serving_default(image_bytes):
        return outputs(_decode_batch(image_bytes, size))

    def serving_float(images):
        return outputs(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    # The first endpoint is also what ExportArchive aliases as serving_default; naming it so keeps it.
    archive.add_endpoint(
        BYTES_SIGNATURE,
        serving_default,
        input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)],
    )
    archive.add_endpoint(
        FLOAT_SIGNATURE,
        serving_float,
        input_signature=[tf.TensorSpec([None, *size, 3], tf.float32, name=FLOAT_INPUT)],
    )
    return archive


def export(
    model: Any,
    model_name: str,
    *,
    base_dir: str | Path = DEFAULT_BASE_DIR,
    class_names: Sequence[str],
    version: int | None = None,
    overwrite: bool = False,
    metadata: dict | None = None,
    task: str | None = None,
    from_logits: bool | None = None,
    top_k: int = DEFAULT_TOP_K,
    verify: bool = True,
    warmup_images: Sequence[bytes] | None = None,
) -> ExportResult:
    """Export ``model`` to ``base_dir/model_name/version/`` for TF Serving; see the module docstring.

    ``task``/``from_logits`` default to the model's tlkeras spec, else to what the output layer's
    activation says. ``warmup_images`` (encoded bytes) become the warmup requests and, with the
    in-memory model, the verification set; synthetic images are used when none are given.
    """
    _check_model_name(model_name)
    if isinstance(class_names, (str, bytes)):
        raise TypeError(
            f"class_names: expected a sequence of names, received the string {class_names!r}"
        )
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise ValueError("class_names: expected at least one name, received none")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names: expected unique names, received {class_names}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected a positive int, received {top_k!r}")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ValueError(f"version: expected a positive int or None, received {version!r}")
    head = _resolve_head(model, task, from_logits)
    if head.num_classes != len(class_names):
        raise ValueError(
            f"class_names: expected {head.num_classes} names for this {head.task} model "
            f"({head.units} output units), received {len(class_names)}"
        )
    if warmup_images is not None:
        warmup_images = [bytes(b) for b in warmup_images]
        if not warmup_images:
            raise ValueError("warmup_images: expected at least one encoded image, received none")
    images = warmup_images or sample_images()

    model_dir = Path(base_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(model_dir)
    version = next_version(base_dir, model_name) if version is None else version
    final = model_dir / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"version {version} of {model_name!r} already exists at {str(final)!r}; pass "
            "overwrite=True (--overwrite) or leave the version unset for the next free one"
        )

    tmp = model_dir / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build_archive(model, class_names, head, top_k).write_out(str(tmp), verbose=False)
        extra = tmp / ASSETS_EXTRA
        extra.mkdir()
        (extra / LABELS_FILE).write_text("".join(f"{c}\n" for c in class_names), encoding="utf-8")
        write_warmup_requests(extra / WARMUP_FILE, model_name, images)
        doc = {
            **(metadata or {}),
            **_spec_metadata(model),
            "model_name": model_name,
            "version": version,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "task": head.task,
            "model_from_logits": head.from_logits,
            "class_names": class_names,
            "num_classes": len(class_names),
            "input_size": list(_input_size(model)),
            "top_k": min(top_k, len(class_names)),
            "preprocessing": (
                "serving_default: tlkeras.data.decode_image (decode_image(channels=3, "
                "expand_animations=False), bilinear antialiased resize to input_size, rounded to "
                "uint8) -> float32; both signatures feed raw 0-255 RGB pixels to the model, which "
                "applies the backbone preprocessing inside"
            ),
            "signatures": {
                BYTES_SIGNATURE: {"inputs": {BYTES_INPUT: "string [None]"}},
                FLOAT_SIGNATURE: {"inputs": {FLOAT_INPUT: "float32 [None, H, W, 3], 0-255"}},
                "outputs": {
                    "probabilities": "float32 [None, num_classes]",
                    "classes": "string [None, top_k]",
                    "scores": "float32 [None, top_k]",
                },
            },
            "limits": {"max_image_bytes": MAX_IMAGE_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS},
            "versions": _versions_info(),
        }
        report = (
            verify_export(tmp, model, images, head=head, class_names=class_names)
            if verify
            else None
        )
        doc["verification"] = report
        (extra / METADATA_FILE).write_text(
            json.dumps(doc, indent=2, ensure_ascii=False, default=str), encoding="utf-8"
        )
        _move_into_place(tmp, final, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(
        path=final,
        version=version,
        model_name=model_name,
        signatures=SIGNATURES,
        verification=report,
    )


def _move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    # os.rename of a directory onto an *empty* directory succeeds on POSIX, so check explicitly.
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"version directory appeared while exporting: {str(final)!r}")
        old = final.with_name(f"{_TMP_PREFIX}{os.getpid()}-old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


# --------------------------------------------------------------------------------------------------
# Verification in a fresh process.


def verify_export(
    path: str | Path,
    model: Any,
    images: Sequence[bytes],
    *,
    head: _Head | None = None,
    class_names: Sequence[str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Reload ``path`` in a fresh Python process and compare it with the in-memory ``model``.

    Checks the signature names, input/output dtypes and shapes, the float signature against
    ``model.predict`` (max abs difference ≤ 1e-5) and the bytes signature against the training
    pipeline's own decoding of ``images`` followed by the model. Returns the child's report;
    raises ``ExportVerificationError`` on any mismatch.
    """
    path = Path(path)
    images = [bytes(b) for b in images]
    if not images:
        raise ValueError("images: expected at least one encoded image, received none")
    head = head or _resolve_head(model, None, None)
    size = _input_size(model)
    pixels = _reference_decode(images, size)
    # A plain call, not model.predict: under a multi-worker strategy predict gathers from every
    # worker, and only the chief exports.
    expected = head.probabilities(model(pixels, training=False)).numpy()
    if class_names is None:
        labels = path / ASSETS_EXTRA / LABELS_FILE
        class_names = labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else []
    with tempfile.TemporaryDirectory(prefix="tlkeras-verify-") as work:
        work = Path(work)
        for i, b in enumerate(images):
            (work / f"image_{i:04d}.bin").write_bytes(b)
        np.savez(work / "expected.npz", pixels=pixels, probabilities=expected)
        (work / "spec.json").write_text(
            json.dumps(
                {
                    "input_size": list(size),
                    "num_classes": len(class_names),
                    "class_names": list(class_names),
                }
            ),
            encoding="utf-8",
        )
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        proc = subprocess.run(
            [sys.executable, "-m", "tlkeras.export", "--verify", str(path), str(work)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise ExportVerificationError(
            f"verification process failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    report = json.loads(lines[-1])
    if not report.get("ok"):
        raise ExportVerificationError(
            f"exported model at {str(path)!r} does not match the Keras model: "
            + "; ".join(report.get("problems", ["unknown"]))
        )
    return report


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
        for name, tol in ((FLOAT_SIGNATURE, FLOAT_TOLERANCE), (BYTES_SIGNATURE, BYTES_TOLERANCE)):
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
                > BYTES_TOLERANCE
            ):
                problems.append(f"{name}: top-1 classes {got_names} != {want_names}")
    report["num_images"] = len(images)
    report["problems"] = problems
    report["ok"] = not problems
    return report


# --------------------------------------------------------------------------------------------------
# Loading for predict and serve (TensorFlow only).


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


def load_exported(path_or_base: str | Path, version: int | None = None) -> ExportedModel:
    """Load a version directory, or the highest (or given) version under a base directory."""
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
        version=int(path.name) if _VERSION_RE.match(path.name) else None,
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
    return "\n".join(lines)


def load_keras_model(path: str | Path, class_names: Sequence[str] | None = None):
    """A ``.keras`` model (Keras ``safe_mode``) and its class names, for exporting.

    ``path`` is a ``.keras`` file or a training run directory holding ``model.keras``; class names
    default to the ``class_names`` of a ``metrics.json`` beside it.
    """
    import keras

    from tlkeras import model as _model  # noqa: F401  (registers tlkeras layers for loading)

    path = Path(path)
    file = path / "model.keras" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".keras":
        raise FileNotFoundError(
            f"--model: expected a .keras file or a run directory with model.keras, received {str(path)!r}"
        )
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


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "--verify":
        print("usage: python -m tlkeras.export --verify SAVED_MODEL_DIR WORK_DIR", file=sys.stderr)
        return 2
    report = _check_in_this_process(Path(argv[1]), Path(argv[2]))
    print(json.dumps(report, default=str), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


class _CallableModule(types.ModuleType):
    """``tlkeras.export(model, ...)`` is the export function while ``tlkeras.export.X`` stays this
    module, so ``from tlkeras import export as export_lib`` keeps working."""

    def __call__(self, *args, **kwargs) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
