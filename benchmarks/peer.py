"""The peer: the Keras "Transfer learning & fine-tuning" guide's recipe, written as a user would.

https://keras.io/guides/transfer_learning/ — ``image_dataset_from_directory`` → cache/prefetch →
augmentation layers → ``preprocess_input`` → frozen base called with ``training=False`` →
GlobalAveragePooling2D → Dropout(0.2) → Dense(1) logit; Adam(1e-3) for the head; then
``base_model.trainable = True``, recompile with Adam(1e-5), fine-tune. The only addition to the guide
is EarlyStopping on the validation split, which tlkeras uses too (same patience, best weights
restored), so both contenders get the same epoch budget and stopping rule.

The guide compiles ``BinaryAccuracy()`` on a logit output: its 0.5 threshold is applied to logits,
so the accuracy it logs is skewed. Training is unaffected (nothing here monitors it); the accuracy
reported by ``run`` thresholds the logit at 0 (probability 0.5), scoring the peer fairly.

Nothing here is tuned: it is the baseline tlkeras is measured against.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from common import BenchConfig


def _moving_means(base_model: keras.Model) -> list[np.ndarray]:
    return [
        np.array(layer.moving_mean)
        for layer in base_model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _accuracy(model: keras.Model, ds: tf.data.Dataset) -> float:
    labels = np.concatenate([y.numpy() for _, y in ds])
    logits = model.predict(ds, verbose=0)[:, 0]
    return float(np.mean((logits > 0) == (labels == 1)))


def guide_model(config: BenchConfig, num_classes: int = 2) -> tuple[keras.Model, keras.Model]:
    """The guide's classifier and its frozen base: augmentation → preprocess → base → GAP →
    Dropout(0.2) → Dense(1) logit (two classes, as in the guide) or Dense(num_classes) logits."""
    size = (config.image_size, config.image_size)
    data_augmentation = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)]
    )
    base_model = keras.applications.MobileNet(
        alpha=config.alpha,
        weights=config.weights,
        input_shape=(*size, 3),
        include_top=False,
    )
    base_model.trainable = False

    inputs = keras.Input(shape=(*size, 3))
    x = data_augmentation(inputs)
    x = keras.applications.mobilenet.preprocess_input(x)
    # The guide: "we make sure that the base_model is running in inference mode here".
    x = base_model(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1 if num_classes == 2 else num_classes)(x)
    return keras.Model(inputs, outputs), base_model


def guide_datasets(folder: str, config: BenchConfig, seed: int) -> tuple[Any, Any]:
    """The guide's input pipeline: ``image_dataset_from_directory`` of ``folder``, 80/20 training
    and validation subsets split with ``seed`` (not yet cached)."""
    return keras.utils.image_dataset_from_directory(
        folder,
        image_size=(config.image_size, config.image_size),
        batch_size=config.batch_size,
        validation_split=0.2,
        subset="both",
        seed=seed,
        verbose=False,
    )


def guide_fit(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    validation_ds: tf.data.Dataset,
    learning_rate: float,
    epochs: int,
    patience: int,
) -> tuple[keras.callbacks.History, float]:
    """The guide's compile + fit, as it does it before and after unfreezing; (history, s).
    More than two classes: the same with sparse categorical cross-entropy on the logits."""
    binary = model.output_shape[-1] == 1
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True)
        if binary
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy() if binary else "accuracy"],
    )
    stopping = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )
    t0 = time.perf_counter()
    history = model.fit(
        train_ds,
        epochs=epochs,
        validation_data=validation_ds,
        callbacks=[stopping] if patience else [],
        verbose=0,
    )
    return history, time.perf_counter() - t0


def run(config: BenchConfig, split_dir: str | Path, seed: int) -> dict[str, Any]:
    """Train the guide's model on ``split_dir/{train,val}``, score it on ``split_dir/test``.

    Returns wall times (seconds) and test accuracies after the frozen phase and after fine-tuning.
    """
    split_dir = Path(split_dir)
    size = (config.image_size, config.image_size)
    keras.utils.set_random_seed(seed)
    started = time.perf_counter()

    def dataset(split: str, shuffle: bool) -> tf.data.Dataset:
        return keras.utils.image_dataset_from_directory(
            split_dir / split,
            image_size=size,
            batch_size=config.batch_size,
            shuffle=shuffle,
            seed=seed,
            verbose=False,
        )

    train_ds = dataset("train", shuffle=True).cache().prefetch(tf.data.AUTOTUNE)
    validation_ds = dataset("val", shuffle=False).cache().prefetch(tf.data.AUTOTUNE)
    test_ds = dataset("test", shuffle=False).cache().prefetch(tf.data.AUTOTUNE)

    model, base_model = guide_model(config)

    def compile_and_fit(learning_rate: float, epochs: int):
        return guide_fit(model, train_ds, validation_ds, learning_rate, epochs, config.patience)

    frozen, frozen_s = compile_and_fit(1e-3, config.epochs)
    frozen_accuracy = _accuracy(model, test_ds)
    frozen_val_accuracy = _accuracy(model, validation_ds)

    means_before = _moving_means(base_model)
    base_model.trainable = True
    fine, fine_tune_s = compile_and_fit(1e-5, config.fine_tune_epochs)
    accuracy = _accuracy(model, test_ds)
    val_accuracy = _accuracy(model, validation_ds)
    _, guide_metric = model.evaluate(test_ds, verbose=0)  # BinaryAccuracy(0.5) on logits
    # Evidence for the BatchNorm note: did training=False keep the moving statistics fixed?
    bn_drift = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(means_before, _moving_means(base_model), strict=True)
    )
    return {
        "frozen_s": frozen_s,
        "fine_tune_s": fine_tune_s,
        "two_phase_s": frozen_s + fine_tune_s,
        "frozen_accuracy": frozen_accuracy,
        "frozen_val_accuracy": frozen_val_accuracy,
        "val_accuracy": val_accuracy,
        "accuracy": accuracy,
        "guide_metric_accuracy": float(guide_metric),
        "frozen_epochs": len(frozen.history["loss"]),
        "fine_tune_epochs": len(fine.history["loss"]),
        "end_to_end_s": time.perf_counter() - started,
        "bn_moving_mean_max_change": bn_drift,
        "mode": "keras guide (augmentation every epoch)",
    }
