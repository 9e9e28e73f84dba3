"""The serving contract of a tlkeras export: decoding in the graph, the head, the two signatures.

Owns what a served request means, not where it is written (``tlkeras.exports.savedmodel``):

- ``serving_default``: ``image_bytes`` tf.string [None] encoded JPEG/PNG/GIF/BMP/WebP, decoded by real
  format, resized exactly as the training pipeline does, then the Keras model (preprocessing inside).
  Byte-size and declared-pixel caps are checked in the graph before decoding.
- ``serving_float``: ``images`` float32 [None, H, W, 3] raw RGB pixels 0–255.

Both return ``probabilities`` float32 [None, C], ``classes`` string [None, k] and ``scores``
float32 [None, k] (top-k by score). How the model's output becomes probabilities (task inference
from ``tlkeras.models.task``: ``Head``/``resolve_head``) lives here too, in one section, with what an
export may add on top: a calibration temperature (``tlkeras.analysis.calibration``) and the mean over
test-time augmentation views (``tlkeras.analysis.tta``), both in the graph (``Head.served``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.analysis import gradcam  # noqa: E402
from tlkeras.analysis.calibration import EPSILON, TINY  # noqa: E402
from tlkeras.data.decoding import decode_and_resize  # noqa: E402
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


# --------------------------------------------------------------------------------------------------
# Decoding: the batch of ``image_bytes``, each image as ``tlkeras.data.decoding`` decodes it
# (one implementation for the training pipeline's reference and the serving graph).


def _decode_batch(images: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    return tf.map_fn(
        lambda x: decode_and_resize(x, image_size),
        images,
        fn_output_signature=tf.TensorSpec([*image_size, 3], tf.float32),
    )


# --------------------------------------------------------------------------------------------------
# What the model's output means: the head (task inference from the output layer).


@dataclass(frozen=True)
class Head:
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


def resolve_head(model: Any, task: str | None, from_logits: bool | None) -> Head:
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
    return Head(task=task, from_logits=bool(from_logits), units=int(model.outputs[0].shape[-1]))


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
    head: Head,
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


def _explain_function(model: Any, names: list[str], head: Head, size: tuple[int, int]) -> Any:
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
