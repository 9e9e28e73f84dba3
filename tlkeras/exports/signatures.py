"""The serving contract of a tlkeras export: decoding in the graph, the head, the two signatures.

Owns what a served request means, not where it is written (``tlkeras.exports.savedmodel``):

- ``serving_default``: ``image_bytes`` tf.string [None] encoded JPEG/PNG/GIF/BMP/WebP, decoded by real
  format, resized exactly as the training pipeline does, then the Keras model (preprocessing inside).
  Byte-size and declared-pixel caps are checked in the graph before decoding.
- ``serving_float``: ``images`` float32 [None, H, W, 3] raw RGB pixels 0–255.

Both return ``probabilities`` float32 [None, C], ``classes`` string [None, k] and ``scores``
float32 [None, k] (top-k by score). How the model's output becomes probabilities (task inference
from ``tlkeras.models.task``: ``_Head``/``_resolve_head``) lives here too, in one section, with what an
export may add on top: a calibration temperature (``tlkeras.analysis.calibration``) and the mean over
test-time augmentation views (``tlkeras.analysis.tta``), both in the graph (``_Head.served``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.analysis import gradcam  # noqa: E402
from tlkeras.analysis.calibration import EPSILON, TINY  # noqa: E402
from tlkeras.data.sources import decode_image  # noqa: E402
from tlkeras.models.task import check_task, infer, infer_from_layer, probabilities  # noqa: E402

BYTES_SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "serving_float"
SIGNATURES = (BYTES_SIGNATURE, FLOAT_SIGNATURE)
# Optional (``write_serving_model(explain=True)``): Grad-CAM heat maps of the top class, bytes in.
EXPLAIN_SIGNATURE = "explain"
EXPLAIN_OUTPUTS = ("heatmaps", "classes", "scores")
BYTES_INPUT = "image_bytes"
FLOAT_INPUT = "images"
OUTPUTS = ("probabilities", "classes", "scores")
DEFAULT_TOP_K = 5
# Caps on one encoded image in the bytes signature (the pixel cap is the training scan's default).
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 40_000_000


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


def reference_decode(images: Sequence[bytes], image_size: tuple[int, int]) -> np.ndarray:
    """The training pipeline's decoding of ``images``, eagerly: float32 [N, H, W, 3]."""
    return np.stack([decode_and_resize(tf.constant(b), image_size).numpy() for b in images]).astype(
        "float32"
    )


# --------------------------------------------------------------------------------------------------
# What the model's output means: the head (task inference from the output layer).


@dataclass(frozen=True)
class _Head:
    task: str
    from_logits: bool
    units: int
    # What the export serves on top of the model (``tlkeras.export(temperature=, tta=)``): each
    # view's probabilities with their logits divided by ``temperature`` (``tlkeras.analysis.calibration``),
    # averaged over ``tta``'s views (a ``tlkeras.analysis.tta.TTAConfig``; None: the image only).
    temperature: float = 1.0
    tta: Any = None

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.task == "binary" and self.units != 1:
            raise ValueError(
                f"task 'binary': expected a model with one sigmoid output unit, received "
                f"{self.units} units (use task='multiclass' for a 2-unit softmax)"
            )

    @property
    def num_classes(self) -> int:
        return 2 if self.task == "binary" else self.units

    def probabilities(self, y: tf.Tensor) -> tf.Tensor:
        p = probabilities(y, self.task, from_logits=self.from_logits)
        # A binary head's one unit becomes two columns: [P(class 0), P(class 1)].
        return tf.concat([1.0 - p, p], axis=-1) if self.task == "binary" else p

    def served(self, model: Any, images: Any) -> tf.Tensor:
        """The served probabilities of ``images``: ``probabilities`` of each view (one model call
        for all views), with the temperature applied, averaged over the views. The serving graph
        and the export's verification (``tlkeras.exports.verify``) both compute it here."""
        views = 1 if self.tta is None else self.tta.num_views
        x = images if views == 1 else tf.concat(self.tta.views(images), axis=0)
        p = self.probabilities(model(x, training=False))
        if self.temperature != 1.0:
            p = _with_temperature(p, self.temperature, self.task)
        if views > 1:
            p = tf.reduce_mean(tf.reshape(p, [views, -1, p.shape[-1]]), axis=0)
        return p


def _with_temperature(p: tf.Tensor, temperature: float, task: str) -> tf.Tensor:
    """``tlkeras.analysis.calibration.apply_temperature`` in the graph: ``softmax(log p / T)`` (a binary
    head's two columns included), ``sigmoid(logit(p) / T)`` per label for a multi-label head."""
    if task == "multilabel":
        q = tf.clip_by_value(p, TINY, 1.0 - EPSILON)
        return tf.sigmoid((tf.math.log(q) - tf.math.log1p(-q)) / temperature)
    return tf.nn.softmax(tf.math.log(tf.maximum(p, TINY)) / temperature, axis=-1)


def _resolve_head(model: Any, task: str | None, from_logits: bool | None) -> _Head:
    """The head of ``model``: ``task``/``from_logits`` as given, else as ``tlkeras.models.task`` infers."""
    if len(model.outputs) != 1:
        raise ValueError(f"expected a model with one output, received {len(model.outputs)}")
    if task is None or from_logits is None:
        try:
            inferred_task, inferred_logits = infer(model)
        except ValueError:  # a plain Keras classifier: read its output layer
            inferred_task, inferred_logits = infer_from_layer(
                model.outputs[0]._keras_history.operation
            )
        task = inferred_task if task is None else task
        from_logits = inferred_logits if from_logits is None else from_logits
    return _Head(task=task, from_logits=bool(from_logits), units=int(model.outputs[0].shape[-1]))


def input_size(model: Any) -> tuple[int, int]:
    if len(model.inputs) != 1:
        raise ValueError(f"expected a model with one image input, received {len(model.inputs)}")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[2] is None:
        raise ValueError(
            f"expected a model input of shape (None, H, W, 3) with H and W fixed, received {shape}"
        )
    return int(shape[1]), int(shape[2])


# --------------------------------------------------------------------------------------------------
# The serving functions.


def write_serving_model(
    model: Any,
    class_names: Sequence[str],
    head: _Head,
    top_k: int,
    path: str,
    *,
    explain: bool = False,
) -> None:
    """Save ``model`` at ``path`` as a SavedModel whose root holds its variables and the
    ``SIGNATURES`` for TF Serving, nothing else.

    Why not Keras's ``ExportArchive``: it walks the model's whole trackable tree for resources
    (lookup tables) before saving; Keras Applications models with a tlkeras head hold variables
    only. Why signatures only, not the functions as attributes as well: saving those serialises
    every concrete function a second time. Why ``autograph=False``: the functions hold no Python
    control flow on tensors (Keras 3 layers use ``ops.cond``), and converting every call costs
    seconds. Measured, MobileNet(0.25) at 224 px: 5.4 s with the functions as attributes and
    autograph, 2.5 s like this. ``serving_default`` calls ``serving_float``: one trace of the model.
    ``explain`` adds ``EXPLAIN_SIGNATURE`` (``_explain_function``).
    """
    size = input_size(model)
    k = min(top_k, head.num_classes)
    names = list(class_names)

    def serving_float(images):
        probabilities = head.served(model, images)  # temperature and TTA views, if any
        scores, indices = tf.math.top_k(probabilities, k=k)
        return {
            "probabilities": probabilities,
            # A constant of the graph, not a captured eager tensor: converters (tf2onnx) would
            # otherwise see the class names as a second input.
            "classes": tf.gather(tf.constant(names, dtype=tf.string), indices),
            "scores": scores,
        }

    float_fn = tf.function(
        serving_float,
        input_signature=[tf.TensorSpec([None, *size, 3], tf.float32, name=FLOAT_INPUT)],
        autograph=False,
    )
    bytes_fn = tf.function(
        lambda image_bytes: float_fn(_decode_batch(image_bytes, size)),
        input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)],
        autograph=False,
    )
    root = tf.Module(name="tlkeras_serving")
    root.model_variables = list(model.variables)
    signatures = {
        BYTES_SIGNATURE: bytes_fn.get_concrete_function(),
        FLOAT_SIGNATURE: float_fn.get_concrete_function(),
    }
    if explain:
        signatures[EXPLAIN_SIGNATURE] = _explain_function(model, names, head, size)
    tf.saved_model.save(root, path, signatures=signatures)


def _explain_function(model: Any, names: list[str], head: _Head, size: tuple[int, int]) -> Any:
    """``EXPLAIN_SIGNATURE``: ``image_bytes`` as ``serving_default`` takes them →
    ``heatmaps`` float32 [None, H, W] (``tlkeras.analysis.gradcam``, in [0, 1]) for each image's top class,
    that class's name ``classes`` string [None] and probability ``scores`` float32 [None].

    The class explained is the model's own top class on the image (at the export's temperature,
    without TTA views: a heat map belongs to one image, so with TTA the served top class may
    differ). One more trace of the model, with the gradient of its last blocks."""
    explain = gradcam.explain_function(model)  # ValueError: no spatial feature map

    def explain_bytes(image_bytes):
        out = explain(_decode_batch(image_bytes, size))
        p = head.probabilities(out["outputs"])
        if head.temperature != 1.0:
            p = _with_temperature(p, head.temperature, head.task)
        return {
            "heatmaps": out["heatmaps"],
            "classes": tf.gather(tf.constant(names, dtype=tf.string), out["classes"]),
            "scores": tf.gather(p, out["classes"], axis=1, batch_dims=1),
        }

    return tf.function(
        explain_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)],
        autograph=False,
    ).get_concrete_function()
