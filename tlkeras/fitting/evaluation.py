"""A trained model on held-out data: its predictions of a split, in the split's order, and the
pooled features of the same forward pass (what the report's data audit embeds).

``fit_phases`` (``tlkeras.fitting.run``) trains; this reads a split once with the traced forward pass
(``tlkeras.models.task.inference_function``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import progress
from tlkeras.data import dataset_arrays
from tlkeras.fitting.frozen import POOL_LAYER
from tlkeras.models.task import infer, inference_function, probabilities


def predictions(model: keras.Model, data: Any, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(labels, probabilities)`` of a split in its (unshuffled) order; ``None`` without it."""
    found = predictions_and_features(model, data, split, with_features=False)
    return None if found is None else found[:2]


def predictions_and_features(
    model: keras.Model, data: Any, split: str, *, with_features: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """``(labels, probabilities, pooled features)`` of a split in its (unshuffled) order, from one
    forward pass; the features are the ``pool`` layer's output (what the data audit embeds; ``None``
    for a model without that layer). ``None`` without the split."""
    dataset = getattr(data, split)
    if dataset is None:
        return None
    task, from_logits = infer(model)
    with progress.step("evaluate"):
        y_true, outputs, features = _evaluate(model, dataset, with_features)
    return y_true, np.asarray(probabilities(outputs, task, from_logits=from_logits)), features


# model -> the same model with its pooled features as a second output (one trace per model).
_WITH_POOL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _with_pool(model: keras.Model) -> keras.Model | None:
    """``model`` with its ``pool`` layer's output as a second output; ``None`` without that layer."""
    if model not in _WITH_POOL:
        try:
            pool = model.get_layer(POOL_LAYER)
        except ValueError:
            return None
        _WITH_POOL[model] = keras.Model(model.inputs, [model.outputs[0], pool.output])
    return _WITH_POOL[model]


def outputs_of(model: keras.Model) -> Callable[[Any], tf.Tensor]:
    """A batch of pixels -> ``model``'s outputs, through the evaluation's traced function (a model is
    traced once for its evaluation, test-time augmentation and the rest of its report)."""
    pooled = _with_pool(model)
    if pooled is None:
        return inference_function(model)
    forward = inference_function(pooled)
    return lambda x: forward(x)[0]


def _evaluate(
    model: keras.Model, dataset: tf.data.Dataset, with_features: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(labels, outputs, pooled features or None)`` of every batch, one forward pass each."""
    pooled = _with_pool(model)
    if pooled is None or not with_features:
        outputs, ys = dataset_arrays(dataset, map_images=outputs_of(model))
        return ys, outputs, None
    (outputs, features), ys = dataset_arrays(dataset, map_images=inference_function(pooled))
    return ys, outputs, features.astype(np.float32)  # bfloat16 under mixed precision
