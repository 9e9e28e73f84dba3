"""Augmentation presets beyond the model's own layers: batch mixing and what each preset means.

``AugmentConfig.preset`` (``tlkeras.models.spec``) picks one of ``PRESETS``. ``light`` and ``strong`` live
entirely in the model's ``augmentation`` Sequential (training only). ``mixup`` and ``cutmix`` keep
``light``'s layers and also blend pairs of images of a training batch with ``keras.layers.MixUp``
/ ``keras.layers.CutMix``; their labels blend in the same proportion, so they run in the tf.data
pipeline of the training set (``batch_mixer``), never inside the model, and only end to end: the
fast frozen path's cached features cannot be mixed (``fast_path_note`` says so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tlkeras.models.spec import MIXING_PRESETS, PRESETS, AugmentConfig
from tlkeras.models.task import check_task

__all__ = [
    "CUTMIX_FACTOR",
    "MIXUP_ALPHA",
    "PRESETS",
    "PRESET_HELP",
    "batch_mixer",
    "fast_path_note",
    "mixes_batches",
]

# MixUp's Beta(alpha, alpha) mixing weight: the paper's (and Keras's) value for ImageNet; most pairs
# stay close to one image, so a short fine-tune still sees mostly recognisable images.
MIXUP_ALPHA = 0.2
# CutMix's patch-area Beta parameter is drawn from [0, factor]: Keras's default.
CUTMIX_FACTOR = 1.0

PRESET_HELP: dict[str, str] = {
    "light": "flip, small rotation, zoom and contrast inside the model (the default)",
    "strong": "flip + RandAugment (2 random ops of 11: geometry, colour, posterize, …) in the model",
    "mixup": "light + MixUp: blends pairs of training images and their labels (end to end only)",
    "cutmix": "light + CutMix: pastes a patch of another training image, labels by area "
    "(end to end only)",
}


def mixes_batches(augment: AugmentConfig | None) -> bool:
    """Whether ``augment`` mixes whole training batches (and their labels) in the pipeline."""
    return augment is not None and augment.preset in MIXING_PRESETS


def batch_mixer(
    augment: AugmentConfig | None, task: str
) -> Callable[[tf.data.Dataset], tf.data.Dataset] | None:
    """The batch-level mixing of ``augment``'s preset, for the training dataset; ``None`` for
    ``light``, ``strong`` or no augmentation.

    The returned function maps a dataset of batched ``(images, labels[, sample_weights])``, labels
    already encoded for the loss (``tlkeras.models.task.encode_labels``: one-hot ``[B, C]`` for
    ``multiclass``, ``[B, 1]`` for ``binary``, multi-hot ``[B, C]`` for ``multilabel``), to
    ``(mixed_images, soft_labels[, sample_weights])``: soft labels are float32 of the same shape
    (rows of a one-hot still sum to 1; binary and multi-hot stay in [0, 1]). Sample weights pass
    through unchanged (the weight of the image a mixed one started from). Apply it after
    batching and label encoding, to the training set only.

    Args:
        augment: the model's ``AugmentConfig`` (its ``seed`` seeds the mixing).
        task: the head task (``tlkeras.models.task.TASKS``).

    Returns:
        ``dataset -> dataset``, or ``None`` when the preset does not mix.
    """
    check_task(task)
    if not mixes_batches(augment):
        return None
    # float32 whatever the global dtype policy: the pipeline's images and labels are float32.
    if augment.preset == "mixup":
        layer = keras.layers.MixUp(alpha=MIXUP_ALPHA, seed=augment.seed, dtype="float32")
    else:
        layer = keras.layers.CutMix(factor=CUTMIX_FACTOR, seed=augment.seed, dtype="float32")

    def mix(images: Any, labels: Any, *rest: Any) -> tuple[Any, ...]:
        out = layer(
            {"images": tf.cast(images, tf.float32), "labels": tf.cast(labels, tf.float32)},
            training=True,
        )
        # Same shape as the labels in: the loss and the class weights see what they saw before.
        soft = tf.ensure_shape(out["labels"], labels.shape)
        return (tf.ensure_shape(out["images"], images.shape), soft, *rest)

    def apply(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.map(mix, num_parallel_calls=tf.data.AUTOTUNE)

    return apply


def fast_path_note(augment: AugmentConfig | None) -> str | None:
    """What the fast frozen path's cached augmented views are views of (``None``: no augmentation).

    The cached views run the model's ``augmentation`` Sequential: ``light``'s or ``strong``'s
    layers. A mixing preset's batch mixing needs the images and labels of a batch together, which
    cached features no longer have, so there the views approximate ``light``.
    """
    if augment is None:
        return None
    if mixes_batches(augment):
        return (
            f"cached views of the light augmentation ({augment.preset} is applied only end to end)"
        )
    if augment.preset == "strong":
        return "cached views of the strong augmentation (flip + RandAugment)"
    return "cached views of the light augmentation"
