"""Head tasks: what a task means for the output layer, the loss, the metrics and the labels.

| task         | output layer               | loss                   | labels fed to the loss  |
|--------------|----------------------------|------------------------|-------------------------|
| `multiclass` | softmax over C units       | categorical CE         | one-hot ``[B, C]``      |
| `binary`     | one sigmoid unit           | binary CE              | ``[B, 1]`` in {0, 1}    |
| `multilabel` | sigmoid over C units       | binary CE              | multi-hot ``[B, C]``    |

``from_logits`` heads drop the activation; the loss then applies it and ``probabilities`` turns
outputs into what the activation would have given. Training, export, evaluation and the sweep all
ask this module, and ``infer`` reads a model's task from its spec or its ``predictions`` layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tlkeras import checks
from tlkeras.models.spec import TASKS, get_spec

PREDICTIONS_LAYER = "predictions"


def check_task(task: str) -> str:
    return checks.choice("task", task, TASKS, as_repr=True)


def output_activation(task: str, *, from_logits: bool = False) -> str | None:
    """The ``predictions`` layer's activation (``None``: linear logits)."""
    check_task(task)
    if from_logits:
        return None
    return "softmax" if task == "multiclass" else "sigmoid"


def infer(model: keras.Model) -> tuple[str, bool]:
    """``(task, from_logits)`` of a model: from ``tlkeras.get_spec`` or its ``predictions`` layer."""
    try:
        head = get_spec(model).head
        return head.task, bool(head.from_logits)
    except (ValueError, AttributeError, KeyError):
        pass
    try:
        layer = model.get_layer(PREDICTIONS_LAYER)
    except ValueError as e:
        raise ValueError(
            f"expected a model with a layer named {PREDICTIONS_LAYER!r} (as tlkeras.build_model "
            f"makes), received a model with layers {[la.name for la in model.layers][-3:]}"
        ) from e
    return infer_from_layer(layer)


def infer_from_layer(layer: Any) -> tuple[str, bool]:
    """``(task, from_logits)`` of an output layer, from its activation and units."""
    activation = getattr(getattr(layer, "activation", None), "__name__", "linear")
    if int(layer.units) == 1:  # one unit is a binary head, whatever else it could be
        return "binary", activation != "sigmoid"
    if activation == "sigmoid":
        return "multilabel", False
    return "multiclass", activation != "softmax"


def probabilities(outputs: Any, task: str, *, from_logits: bool) -> tf.Tensor:
    """Model outputs as probabilities: the activation a logits head left to the loss."""
    outputs = tf.cast(outputs, tf.float32)
    if not from_logits:
        return outputs
    return (
        tf.nn.softmax(outputs, axis=-1) if check_task(task) == "multiclass" else tf.sigmoid(outputs)
    )


def loss_for(task: str, *, from_logits: bool = False, label_smoothing: float = 0.0):
    """The loss of a head task: categorical CE on one-hot labels, binary CE otherwise."""
    if check_task(task) == "multiclass":
        return keras.losses.CategoricalCrossentropy(
            from_logits=from_logits, label_smoothing=label_smoothing
        )
    return keras.losses.BinaryCrossentropy(from_logits=from_logits, label_smoothing=label_smoothing)


def metrics_for(task: str, *, from_logits: bool = False) -> list[keras.metrics.Metric]:
    """An ``accuracy`` metric that fits the task (logit heads threshold at 0, not 0.5)."""
    if check_task(task) == "multiclass":
        return [keras.metrics.CategoricalAccuracy(name="accuracy")]
    return [keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0 if from_logits else 0.5)]


def encode_labels(dataset: tf.data.Dataset | None, task: str, num_classes: int):
    """Map int labels to the targets the loss expects: one-hot (multiclass), ``[B, 1]`` (binary)."""
    if dataset is None:
        return None
    check_task(task)

    def encode(x, y):
        if task == "multiclass":
            if y.shape.rank == 2:  # already one-hot / soft labels
                return x, tf.cast(y, tf.float32)
            return x, tf.one_hot(tf.cast(y, tf.int32), num_classes)
        if task == "binary":
            return x, tf.reshape(tf.cast(y, tf.float32), [-1, 1])
        return x, tf.cast(y, tf.float32)

    return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE)


# model -> {(dtype, shape of one example): its traced forward pass}; an entry goes with its model.
_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_function(model: keras.Model) -> Callable[[Any], tf.Tensor]:
    """``model(x, training=False)`` traced once per model and input kind, whatever the batch size.

    A plain call, not ``predict_on_batch`` (under a strategy that would split, or gather across
    workers, a batch that only this process evaluates). One ``tf.function`` per call site made anew
    for every evaluation set off TensorFlow's "triggered tf.function retracing" warnings at the
    end of every run; a batch dimension of ``None`` and this cache trace each model once."""
    traced = _FORWARD.setdefault(model, {})
    ref = weakref.ref(model)  # the cache must not keep its key alive

    def forward(x: Any) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        key = (x.dtype.name, tuple(x.shape[1:]))
        if key not in traced:
            spec = tf.TensorSpec([None, *x.shape[1:]], x.dtype)
            traced[key] = tf.function(
                lambda t: ref()(t, training=False), input_signature=[spec], autograph=False
            )
        return traced[key](x)

    return forward
