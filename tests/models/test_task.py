"""Head tasks: loss, metrics, label encoding, activation and inference from a model."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkeras
from tlkeras.models import task as task_lib

SMALL = {"weights": None, "input_shape": (32, 32, 3), "backbone_kwargs": {"alpha": 0.25}}


@pytest.mark.parametrize(
    "task, from_logits, loss_cls",
    [
        ("multiclass", False, keras.losses.CategoricalCrossentropy),
        ("multiclass", True, keras.losses.CategoricalCrossentropy),
        ("binary", False, keras.losses.BinaryCrossentropy),
        ("multilabel", True, keras.losses.BinaryCrossentropy),
    ],
)
def test_loss_per_task_with_label_smoothing(task, from_logits, loss_cls):
    loss = task_lib.loss_for(task, from_logits=from_logits, label_smoothing=0.1)
    assert isinstance(loss, loss_cls)
    assert loss.get_config()["from_logits"] is from_logits
    assert loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    (metric,) = task_lib.metrics_for(task, from_logits=from_logits)
    assert metric.name == "accuracy"
    if task != "multiclass":
        assert metric.get_config()["threshold"] == (0.0 if from_logits else 0.5)


def test_label_smoothing_changes_the_loss_value():
    y = np.eye(3)[[0, 1]]
    p = np.array([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]])
    plain = float(task_lib.loss_for("multiclass")(y, p))
    smooth = float(task_lib.loss_for("multiclass", label_smoothing=0.2)(y, p))
    assert smooth > plain + 0.1


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task: expected one of"):
        task_lib.loss_for("regression")


@pytest.mark.parametrize(
    "head, num_classes, task, shape",
    [
        (tlkeras.HeadConfig(), 3, "multiclass", (None, 3)),
        (tlkeras.HeadConfig(task="binary"), 2, "binary", (None, 1)),
        (tlkeras.HeadConfig(task="multilabel", from_logits=True), 3, "multilabel", (None, 3)),
    ],
)
def test_head_task_and_encoded_labels(head, num_classes, task, shape):
    model = tlkeras.build_model("MobileNet", num_classes, head=head, **SMALL)
    assert task_lib.infer(model) == (task, head.from_logits)
    y = np.array([0, 1, 1], "int32") if task != "multilabel" else np.eye(3, dtype="float32")
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((3, 32, 32, 3), "float32"), y)).batch(3)
    _, encoded = next(iter(task_lib.encode_labels(ds, task, num_classes)))
    assert tuple(encoded.shape) == (3,) + shape[1:]
    assert encoded.dtype == tf.float32
    if task == "multiclass":
        np.testing.assert_array_equal(encoded.numpy(), np.eye(3)[[0, 1, 1]])


@pytest.mark.parametrize(
    "name, from_logits, activation",
    [
        ("multiclass", False, "softmax"),
        ("binary", False, "sigmoid"),
        ("multilabel", False, "sigmoid"),
        ("multiclass", True, None),
        ("binary", True, None),
    ],
)
def test_output_activation_is_what_the_built_layer_uses(name, from_logits, activation):
    assert task_lib.output_activation(name, from_logits=from_logits) == activation
    head = tlkeras.HeadConfig(task=name, from_logits=from_logits)
    model = tlkeras.build_model("MobileNet", 2 if name == "binary" else 3, head=head, **SMALL)
    built = model.get_layer("predictions").activation.__name__
    assert built == (activation or "linear")


def test_infer_from_the_predictions_layer_of_a_plain_model():
    inputs = keras.Input((4,))
    for units, act, expected in [
        (3, "softmax", ("multiclass", False)),
        (1, "sigmoid", ("binary", False)),
        (3, "sigmoid", ("multilabel", False)),
        (3, None, ("multiclass", True)),
        (1, None, ("binary", True)),
    ]:
        model = keras.Model(
            inputs, keras.layers.Dense(units, activation=act, name="predictions")(inputs)
        )
        assert task_lib.infer(model) == expected
    unnamed = keras.layers.Dense(2, activation="sigmoid", name="out")
    with pytest.raises(ValueError, match="layer named 'predictions'"):
        task_lib.infer(keras.Model(inputs, unnamed(inputs)))
    assert task_lib.infer_from_layer(unnamed) == ("multilabel", False)


@pytest.mark.parametrize("name", ["multiclass", "binary", "multilabel"])
def test_probabilities_apply_the_missing_activation(name):
    logits = np.array([[2.0, -1.0, 0.5]], "float32")
    expected = tf.nn.softmax(logits) if name == "multiclass" else tf.sigmoid(logits)
    np.testing.assert_allclose(
        task_lib.probabilities(logits, name, from_logits=True), expected, atol=1e-7
    )
    np.testing.assert_array_equal(task_lib.probabilities(logits, name, from_logits=False), logits)


def test_inference_is_traced_once_per_model_whatever_the_batch_size():
    import gc

    import numpy as np

    from tlkeras.models import task as task_lib

    model = tlkeras.build_model("MobileNet", 3, weights=None, input_shape=(32, 32, 3))
    forward = task_lib.inference_function(model)
    for n in (8, 8, 3, 1):
        x = np.random.default_rng(n).uniform(0, 255, (n, 32, 32, 3)).astype("float32")
        np.testing.assert_allclose(forward(x), model(x, training=False), rtol=1e-5, atol=1e-6)
    (traced,) = task_lib._FORWARD[model].values()
    assert traced.experimental_get_tracing_count() == 1
    assert task_lib.inference_function(model) is not forward  # a new closure, the same trace
    del model, forward, traced
    gc.collect()
    assert len(task_lib._FORWARD) == 0 or all(m is not None for m in task_lib._FORWARD)
