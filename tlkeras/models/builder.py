"""The classifier: input → (augmentation) → preprocessing → backbone → pooling → head → predictions.

Every layer tlkeras adds is named, so code finds it by name:

    image (Input, float32 raw RGB pixels 0–255)
    augmentation   Sequential of Random* layers, only if `augment` is given; active in training only
    preprocessing  the backbone's own `preprocess_input` (identity for models that preprocess inside);
                   also carries the ModelSpec, so a saved-and-reloaded model still knows how it was built
    backbone       the nested keras.applications model, include_top=False
    pool           GlobalAveragePooling2D | GlobalMaxPooling2D
    head_dense_i, head_dropout_i   optional hidden layers
    head_dropout   Dropout before the classifier
    predictions    Dense: softmax (multiclass), sigmoid (multilabel), one sigmoid unit (binary), or
                   linear when `from_logits` (the loss must then be built with from_logits=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras

from tlkeras import checks
from tlkeras.models import task as task_lib
from tlkeras.models.backbones import build_backbone, check_input_shape, get_backbone
from tlkeras.models.spec import (  # noqa: F401  (re-exported: tlkeras.models.builder is where users look)
    AugmentConfig,
    BackbonePreprocessing,
    HeadConfig,
    ModelSpec,
    get_spec,
)
from tlkeras.models.strategy import Strategy, apply_strategy, check_fine_tune_at

# Keras dtype policies a model is built in. Mixed ones compute in 16 bits and keep float32
# variables; the image input and the ``predictions`` layer stay float32 whatever the policy (a
# stable softmax, float32 probabilities, and an export that takes float32 pixels).
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def check_dtype_policy(name: Any) -> str:
    return checks.choice("dtype_policy", name, DTYPE_POLICIES, as_repr=True)


@contextlib.contextmanager
def _dtype_policy(name: str) -> Iterator[None]:
    """Keras reads the global policy when a layer is created (applications take no ``dtype``)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _check_num_classes(num_classes: int, task: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes: expected an int, received {type(num_classes).__name__}")
    if task == "binary" and num_classes != 2:
        raise ValueError(f"num_classes: task 'binary' expects 2, received {num_classes}")
    if task == "multiclass" and num_classes < 2:
        raise ValueError(f"num_classes: task 'multiclass' expects >= 2, received {num_classes}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, received {num_classes}")


def build_model(
    backbone: str,
    num_classes: int,
    *,
    strategy: Strategy | str = Strategy.FEATURE_EXTRACTION,
    fine_tune_at: int | None = None,
    weights: str | None = "imagenet",
    input_shape: tuple[int, int, int] | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    head: HeadConfig | None = None,
    augment: AugmentConfig | None = None,
    train_bn: bool | None = None,
    name: str | None = None,
    dtype_policy: str = "float32",
) -> keras.Model:
    """A transfer-learning classifier on the ``keras.applications`` model ``backbone``.

    ``strategy`` sets which blocks train now (``tlkeras.models.strategy``); ``fine_tune_at`` is the first
    trainable block for ``partial`` (negative counts from the end). ``weights``: ``"imagenet"``, a
    weights-file path, or ``None`` (required by ``scratch``). ``train_bn`` defaults to False for pretrained
    strategies and True for ``scratch`` (the BatchNorm rule in ``tlkeras.models.strategy``).
    ``dtype_policy``: one of ``DTYPE_POLICIES``; under ``mixed_float16`` the phase runner scales
    the loss (``tlkeras.fitting.compiling``).
    """
    strategy = Strategy.parse(strategy)
    check_fine_tune_at(strategy, fine_tune_at)
    check_dtype_policy(dtype_policy)
    head = head or HeadConfig()
    checks.instance("head", head, HeadConfig, "a HeadConfig")
    checks.instance("augment", augment, AugmentConfig, "an AugmentConfig", optional=True)
    _check_num_classes(num_classes, head.task)
    if strategy is Strategy.SCRATCH and weights is not None:
        raise ValueError(
            f"weights: strategy 'scratch' trains from random init and expects weights=None, "
            f"received {weights!r}"
        )
    if train_bn is None:
        train_bn = strategy is Strategy.SCRATCH
    if strategy is Strategy.SCRATCH and not train_bn:
        raise ValueError(
            "train_bn: strategy 'scratch' must train BatchNormalization; expected True or None, received False"
        )
    spec_row = get_backbone(backbone)
    input_shape = check_input_shape(
        spec_row, tuple(input_shape) if input_shape else (spec_row.default_size,) * 2 + (3,)
    )
    backbone_kwargs = dict(backbone_kwargs or {})
    spec = ModelSpec(
        backbone=spec_row.name,
        num_classes=num_classes,
        input_shape=input_shape,
        strategy=strategy.value,
        fine_tune_at=fine_tune_at,
        weights=weights,
        backbone_kwargs=backbone_kwargs,
        head=head,
        augment=augment,
        train_bn=train_bn,
        dtype_policy=dtype_policy,
    )
    with _dtype_policy(dtype_policy):
        model = _build(spec, spec_row.name, base_name=name)
    object.__setattr__(model, "_tlkeras_spec", spec)
    apply_strategy(model, strategy, fine_tune_at)
    return model


def _build(spec: ModelSpec, backbone: str, base_name: str | None) -> keras.Model:
    input_shape, head, augment = spec.input_shape, spec.head, spec.augment
    base = build_backbone(backbone, input_shape, spec.weights, **spec.backbone_kwargs)
    base.name = "backbone"
    L = keras.layers
    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    if augment:
        with _dtype_policy("float32"):  # raw pixels; its training/inference branches must agree
            x = augment.build()(inputs)
    else:
        x = inputs
    x = BackbonePreprocessing(backbone, spec=spec.to_dict(), name="preprocessing")(x)
    # BN's inference mode is set by trainable flags (tlkeras.models.strategy), not training=False here:
    # Keras 3 overrides a nested model's recorded training=False with the outer call's value.
    x = base(x)
    pool = L.GlobalAveragePooling2D if head.pooling == "avg" else L.GlobalMaxPooling2D
    x = pool(name="pool")(x)
    reg = keras.regularizers.L2(head.l2) if head.l2 else None
    for i, units in enumerate(head.hidden_units, start=1):
        x = L.Dense(units, activation="relu", kernel_regularizer=reg, name=f"head_dense_{i}")(x)
        x = L.Dropout(head.dropout, name=f"head_dropout_{i}")(x)
    x = L.Dropout(head.dropout, name="head_dropout")(x)
    outputs = L.Dense(
        head.output_units(spec.num_classes),
        activation=task_lib.output_activation(head.task, from_logits=head.from_logits),
        kernel_regularizer=reg,
        dtype="float32",
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name=base_name or f"tlkeras_{backbone.lower()}")
