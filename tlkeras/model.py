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

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import keras

from tlkeras.backbones import build_backbone, check_input_shape, get_backbone
from tlkeras.strategy import Strategy, apply_strategy, check_fine_tune_at

TASKS = ("multiclass", "binary", "multilabel")
POOLINGS = ("avg", "max")
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")


def _check_fraction(name: str, value: float, *, upper_inclusive: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name}: expected a number in {bound}, received {value!r}")


@dataclass(frozen=True)
class HeadConfig:
    """The new classifier on top of the pooled backbone features."""

    pooling: str = "avg"
    hidden_units: tuple[int, ...] = ()
    dropout: float = 0.2
    task: str = "multiclass"
    from_logits: bool = False
    l2: float = (
        0.0  # L2 penalty on the head's Dense kernels (AdamW weight decay is the optimizer's)
    )

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, received {self.pooling!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, received {self.task!r}")
        units = tuple(self.hidden_units)
        if any(isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in units):
            raise ValueError(
                f"hidden_units: expected positive ints, received {self.hidden_units!r}"
            )
        object.__setattr__(self, "hidden_units", units)
        _check_fraction("dropout", self.dropout)
        if not isinstance(self.l2, (int, float)) or self.l2 < 0:
            raise ValueError(f"l2: expected a number >= 0, received {self.l2!r}")

    def output_units(self, num_classes: int) -> int:
        return 1 if self.task == "binary" else num_classes

    @property
    def activation(self) -> str | None:
        if self.from_logits:
            return None
        return "softmax" if self.task == "multiclass" else "sigmoid"


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation as Keras preprocessing layers inside the model (training only).

    Factors follow the Keras layers: ``rotation=0.1`` is ±10 % of a full turn, ``zoom``/``translation``
    a fraction of the side, ``contrast`` a fraction of the contrast; 0 leaves a layer out.
    """

    flip: str = "horizontal"
    rotation: float = 0.1
    zoom: float = 0.1
    contrast: float = 0.1
    translation: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.flip not in FLIPS:
            raise ValueError(f"flip: expected one of {FLIPS}, received {self.flip!r}")
        for name in ("rotation", "zoom", "contrast", "translation"):
            _check_fraction(name, getattr(self, name))

    def build(self) -> keras.Sequential:
        L = keras.layers
        seed = self.seed
        parts: list[keras.layers.Layer] = []
        if self.flip != "none":
            parts.append(L.RandomFlip(self.flip, seed=seed, name="random_flip"))
        if self.rotation:
            parts.append(
                L.RandomRotation(
                    self.rotation, fill_mode="reflect", seed=seed, name="random_rotation"
                )
            )
        if self.zoom:
            parts.append(
                L.RandomZoom(self.zoom, fill_mode="reflect", seed=seed, name="random_zoom")
            )
        if self.translation:
            parts.append(
                L.RandomTranslation(
                    self.translation,
                    self.translation,
                    fill_mode="reflect",
                    seed=seed,
                    name="random_translation",
                )
            )
        if self.contrast:
            parts.append(
                L.RandomContrast(
                    self.contrast, value_range=(0, 255), seed=seed, name="random_contrast"
                )
            )
        return keras.Sequential(parts, name="augmentation")


@dataclass(frozen=True)
class ModelSpec:
    """How a tlkeras model was built: enough to rebuild it, report it and export it."""

    backbone: str
    num_classes: int
    input_shape: tuple[int, int, int]
    strategy: str
    fine_tune_at: int | None = None
    weights: str | None = "imagenet"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig | None = None
    train_bn: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        d["head"] = HeadConfig(**d.get("head") or {})
        d["augment"] = AugmentConfig(**d["augment"]) if d.get("augment") else None
        return cls(**d)


@keras.saving.register_keras_serializable(package="tlkeras")
class BackbonePreprocessing(keras.layers.Layer):
    """Applies the backbone family's own ``preprocess_input`` to raw 0–255 RGB pixels.

    It also carries the model's ``ModelSpec`` in its config, so ``get_spec`` works on a model loaded from
    a ``.keras`` file.
    """

    def __init__(self, backbone: str, spec: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self.spec = spec
        self._preprocess = get_backbone(backbone).preprocess

    def call(self, inputs):
        return self._preprocess(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone": self.backbone, "spec": self.spec}


def get_spec(model: keras.Model) -> ModelSpec:
    """The ``ModelSpec`` of a model built by ``build_model`` (also after saving and loading)."""
    spec = getattr(model, "_tlkeras_spec", None)
    if spec is not None:
        return spec
    try:
        layer = model.get_layer("preprocessing")
    except ValueError:
        layer = None
    if not isinstance(layer, BackbonePreprocessing) or not layer.spec:
        raise ValueError(
            f"expected a model built by tlkeras.build_model (with a 'preprocessing' layer carrying "
            f"its spec), received {getattr(model, 'name', type(model).__name__)!r}"
        )
    spec = ModelSpec.from_dict(layer.spec)
    object.__setattr__(model, "_tlkeras_spec", spec)
    return spec


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
) -> keras.Model:
    """A transfer-learning classifier on the ``keras.applications`` model ``backbone``.

    ``strategy`` sets which blocks train now (``tlkeras.strategy``); ``fine_tune_at`` is the first
    trainable block for ``partial`` (negative counts from the end). ``weights``: ``"imagenet"``, a
    weights-file path, or ``None`` (required by ``scratch``). ``train_bn`` defaults to False for pretrained
    strategies and True for ``scratch`` (the BatchNorm rule in ``tlkeras.strategy``).
    """
    strategy = Strategy.parse(strategy)
    check_fine_tune_at(strategy, fine_tune_at)
    head = head or HeadConfig()
    if not isinstance(head, HeadConfig):
        raise TypeError(f"head: expected a HeadConfig, received {type(head).__name__}")
    if augment is not None and not isinstance(augment, AugmentConfig):
        raise TypeError(
            f"augment: expected an AugmentConfig or None, received {type(augment).__name__}"
        )
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
    )

    base = build_backbone(spec_row.name, input_shape, weights, **backbone_kwargs)
    base.name = "backbone"
    L = keras.layers
    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = augment.build()(inputs) if augment else inputs
    x = BackbonePreprocessing(spec_row.name, spec=spec.to_dict(), name="preprocessing")(x)
    # BN's inference mode is set by trainable flags (tlkeras.strategy), not training=False here:
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
        head.output_units(num_classes),
        activation=head.activation,
        kernel_regularizer=reg,
        dtype="float32",
        name="predictions",
    )(x)
    model = keras.Model(inputs, outputs, name=name or f"tlkeras_{spec_row.name.lower()}")
    object.__setattr__(model, "_tlkeras_spec", spec)
    apply_strategy(model, strategy, fine_tune_at)
    return model
