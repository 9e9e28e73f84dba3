"""What a tlkeras model is made of, as data: ``HeadConfig``, ``AugmentConfig`` and ``ModelSpec``.

Frozen dataclasses, validated on creation, below every module that builds or inspects a model
(``blocks``, ``strategy``, ``task``, ``model``): they need ``get_spec`` and nothing above it. The spec
rides in the ``preprocessing`` layer's config (``BackbonePreprocessing``), so a model loaded from a
``.keras`` file still knows how it was built (KerasHub's idea: the config is the constructor's
arguments).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import keras

from tlkeras import checks
from tlkeras.models.backbones import get_backbone

# The head tasks (their losses, metrics and activations: tlkeras.models.task).
TASKS = ("multiclass", "binary", "multilabel")
POOLINGS = ("avg", "max")
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")
# Augmentation presets (tlkeras.data.augment.PRESET_HELP says what each does). "light" is the layer list
# tlkeras has always built, so a spec saved before presets existed rebuilds the same model.
PRESETS = ("light", "strong", "mixup", "cutmix")
# Presets that also mix whole batches in the training pipeline (tlkeras.data.augment.batch_mixer).
MIXING_PRESETS = ("mixup", "cutmix")
# RandAugment for "strong": Keras's own defaults (2 ops of 11, factor 0.5), not tuned here.
RANDAUGMENT_NUM_OPS = 2
RANDAUGMENT_FACTOR = 0.5


@dataclass(frozen=True)
class HeadConfig:
    """The new classifier on top of the pooled backbone features."""

    pooling: str = "avg"
    hidden_units: tuple[int, ...] = ()
    dropout: float = field(default=0.2, metadata={"help": "Dropout before the classifier layer."})
    task: str = "multiclass"
    from_logits: bool = False
    l2: float = (
        0.0  # L2 penalty on the head's Dense kernels (AdamW weight decay is the optimizer's)
    )

    def __post_init__(self) -> None:
        checks.choice("pooling", self.pooling, POOLINGS, as_repr=True)
        checks.choice("task", self.task, TASKS, as_repr=True)
        units = tuple(self.hidden_units)
        if any(isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in units):
            raise ValueError(
                f"hidden_units: expected positive ints, received {self.hidden_units!r}"
            )
        object.__setattr__(self, "hidden_units", units)
        checks.fraction("dropout", self.dropout)
        checks.number("l2", self.l2, low=0)

    def output_units(self, num_classes: int) -> int:
        return 1 if self.task == "binary" else num_classes


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation as Keras preprocessing layers inside the model (training only).

    Factors follow the Keras layers: ``rotation=0.1`` is ±10 % of a full turn, ``zoom``/``translation``
    a fraction of the side, ``contrast`` a fraction of the contrast; 0 leaves a layer out.

    ``preset`` (one of ``PRESETS``): ``"light"`` builds those layers; ``"strong"`` the flip then
    ``keras.layers.RandAugment`` (its own rotations, shears, colour ops: the other factors are
    unused); ``"mixup"``/``"cutmix"`` build what ``"light"`` builds and also mix batches of the
    training set (``tlkeras.data.augment.batch_mixer``: labels are mixed too, so not inside the model).
    """

    flip: str = "horizontal"
    rotation: float = 0.1
    zoom: float = 0.1
    contrast: float = 0.1
    translation: float = 0.0
    seed: int | None = None
    # Its option is --augment_preset (the scripts' --augment turns augmentation on).
    preset: str = field(
        default="light",
        metadata={
            "help": "The augmentation preset (with --augment).",
            "choices": PRESETS,
            "name": "augment_preset",
        },
    )

    def __post_init__(self) -> None:
        checks.choice("AugmentConfig.preset", self.preset, PRESETS, as_repr=True)
        checks.choice("flip", self.flip, FLIPS, as_repr=True)
        for name in ("rotation", "zoom", "contrast", "translation"):
            checks.fraction(name, getattr(self, name))

    def build(self) -> keras.Sequential:
        L = keras.layers
        seed = self.seed
        parts: list[keras.layers.Layer] = []
        if self.flip != "none":
            parts.append(L.RandomFlip(self.flip, seed=seed, name="random_flip"))
        if self.preset == "strong":
            parts.append(
                L.RandAugment(
                    value_range=(0, 255),  # the model's input: raw pixels, before preprocessing
                    num_ops=RANDAUGMENT_NUM_OPS,
                    factor=RANDAUGMENT_FACTOR,
                    seed=seed,
                    name="rand_augment",
                )
            )
            return keras.Sequential(parts, name="augmentation")
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
    dtype_policy: str = (
        "float32"  # the Keras policy it was built in (tlkeras.models.builder.DTYPE_POLICIES)
    )

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
