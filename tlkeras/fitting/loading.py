"""Data and model from what a caller asked for: the one sequence every entry point shares.

``load_and_build`` runs, in this order: backbone kwargs (``source:`` weights fill in the source
model's) → image size (``"auto"``/``None`` chosen from the data) → load the data (or take a loaded
``ImageData``) → resolve the weights (``source:TASK`` pre-trains into the cache; under a multi-worker
``tf.distribute`` strategy the chief does it first) → build the model in the strategy's scope.
:class:`ModelRequest` and :class:`DataRequest` hold what was asked; :class:`Loaded` what came out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from tlkeras import progress
from tlkeras.data import DataConfig, ImageData, image_size_for, load
from tlkeras.fitting import distribute, pretrain
from tlkeras.models import weights as weights_lib
from tlkeras.models.blocks import blocks
from tlkeras.models.builder import AugmentConfig, HeadConfig, build_model
from tlkeras.models.strategy import Strategy


@dataclass(frozen=True)
class ModelRequest:
    """The model asked for, as ``tlkeras.train`` takes it (nothing resolved yet).

    ``backbone_kwargs=None`` with ``source:`` weights is the source model's; ``image_size`` is an
    int, ``(height, width)``, ``"auto"`` or ``None`` (``tlkeras.data.sizing.choose_image_size``);
    ``weights`` anything ``tlkeras.fitting.pretrain.resolve`` takes; ``fine_tune_at=None`` with
    ``partial`` fine-tunes the top half of the blocks; ``head=None`` is ``build_model``'s default
    head; ``dtype_policy`` as ``build_model``'s.
    """

    backbone: str = weights_lib.DEFAULT_BACKBONE
    backbone_kwargs: dict[str, Any] | None = None
    weights: Any = None
    image_size: Any = None
    strategy: Strategy | str = Strategy.FULL
    fine_tune_at: int | None = None
    head: HeadConfig | None = None
    augment: AugmentConfig | None = None
    train_bn: bool | None = None
    dtype_policy: str = "float32"


@dataclass(frozen=True)
class DataRequest:
    """The data asked for: ``tlkeras.data.load``'s source, ``validation`` and split settings."""

    source: Any
    validation: Any = None
    validation_split: float = DataConfig.validation_split
    test_split: float = DataConfig.test_split
    max_bad_fraction: float = DataConfig.max_bad_fraction
    batch_size: int = DataConfig.batch_size
    seed: int = DataConfig.seed


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_and_build` made: the data, the model (``None`` unless built) and the
    resolved settings it was built with."""

    data: ImageData
    model: keras.Model | None
    weights: str | None  # resolved: None, "imagenet" or a file path
    backbone_kwargs: dict[str, Any]
    image_size: tuple[int, int]
    fine_tune_at: int | None
    head: HeadConfig | None


def load_and_build(
    model: ModelRequest,
    data: DataRequest | ImageData,
    *,
    build: bool = True,
    num_classes: int | None = None,
    scope: tf.distribute.Strategy | None = None,
    verbose: int = 0,
) -> Loaded:
    """Resolve ``model``'s backbone kwargs and image size, load ``data``, resolve the weights and
    build the model.

    1. ``backbone_kwargs``: ``tlkeras.models.weights.backbone_kwargs_for``.
    2. image size: ``tlkeras.data.sizing.image_size_for`` from ``data``'s source; an ``ImageData``
       given as ``data`` is used as loaded (its ``image_size``; ``model.image_size`` is ignored).
    3. ``tlkeras.data.load`` of the :class:`DataRequest` at that size (printing the data's summary
       when ``verbose``).
    4. on multi-label data a given ``head`` is made multi-label; ``partial`` without ``fine_tune_at``
       gets :func:`default_fine_tune_at` (said when ``verbose``).
    5. :func:`resolve_weights` (``source:`` pre-training shows progress when ``verbose``).
    6. unless ``build=False``: ``tlkeras.build_model`` with ``num_classes`` (default: the data's)
       inside ``scope`` (default: the current ``tf.distribute`` strategy).

    Seeds nothing: a caller that wants a reproducible head initialisation seeds first.
    """
    scope = scope or tf.distribute.get_strategy()
    backbone_kwargs = weights_lib.backbone_kwargs_for(
        model.backbone, model.backbone_kwargs, model.weights
    )
    if isinstance(data, ImageData):
        size, loaded = tuple(data.image_size), data
    else:
        size = image_size_for(model.image_size, model.weights, model.backbone, data.source)
        with progress.step("load"):
            loaded = load_data(data, size, verbose=verbose)
    input_shape = (*size, 3)
    head = model.head
    if loaded.multilabel and head is not None and head.task != "multilabel":
        head = dataclasses.replace(head, task="multilabel")
    fine_tune_at = model.fine_tune_at
    if Strategy.parse(model.strategy) is Strategy.PARTIAL and fine_tune_at is None:
        fine_tune_at = default_fine_tune_at(model.backbone, input_shape, backbone_kwargs)
        if verbose:
            print(f"partial: no fine_tune_at given; fine-tuning the top half ({fine_tune_at=})")
    with progress.step("build"):
        resolved = resolve_weights(
            model.weights, model.backbone, backbone_kwargs, input_shape, scope, verbose
        )
    built = None
    if build:
        with scope.scope(), progress.step("build"):
            built = build_model(
                model.backbone,
                len(loaded.class_names) if num_classes is None else num_classes,
                strategy=model.strategy,
                fine_tune_at=fine_tune_at,
                weights=None if resolved is None else str(resolved),
                input_shape=input_shape,
                backbone_kwargs=backbone_kwargs,
                head=head,
                augment=model.augment,
                train_bn=model.train_bn,
                dtype_policy=model.dtype_policy,
            )
    return Loaded(loaded, built, resolved, backbone_kwargs, size, fine_tune_at, head)


def load_data(request: DataRequest, image_size: tuple[int, int], verbose: int = 0) -> ImageData:
    """``tlkeras.data.load`` of ``request`` at ``image_size``; its summary printed when
    ``verbose``."""
    data = load(
        request.source,
        validation=request.validation,
        image_size=image_size,
        batch_size=request.batch_size,
        validation_split=request.validation_split,
        test_split=request.test_split,
        seed=request.seed,
        max_bad_fraction=request.max_bad_fraction,
    )
    if verbose:
        print(data.summary())
    return data


def default_fine_tune_at(
    backbone: str, input_shape: tuple[int, int, int], backbone_kwargs: dict[str, Any] | None = None
) -> int:
    """``partial`` without a block index: fine-tune the top half of the backbone's blocks.

    Counts the blocks on a weightless build (cheap: no weights are read).
    """
    probe = build_model(
        backbone, 2, weights=None, input_shape=input_shape, backbone_kwargs=backbone_kwargs
    )
    return max(1, len(blocks(probe)) // 2)


def resolve_weights(
    weights: Any,
    backbone: str,
    backbone_kwargs: dict[str, Any],
    input_shape: tuple[int, int, int],
    strategy_tf: tf.distribute.Strategy | None = None,
    verbose: int = 0,
) -> str | None:
    """``tlkeras.fitting.pretrain.resolve``; the chief pre-trains ``source:`` weights into the
    (shared) cache before the other workers look there."""
    strategy_tf = strategy_tf or tf.distribute.get_strategy()
    multi_worker, chief = distribute.is_multi_worker(strategy_tf), distribute.is_chief(strategy_tf)
    if multi_worker and not chief:
        distribute.barrier(strategy_tf)
    resolved = pretrain.resolve(
        weights, backbone, backbone_kwargs, input_shape, progress=verbose > 0
    )
    if multi_worker and chief:
        distribute.barrier(strategy_tf)
    return resolved
