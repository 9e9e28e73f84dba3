"""Weights: the one place a ``weights`` value is understood, without training or loading anything.

What a user writes, and what :func:`check` makes of it for ``tlkeras.build_model``:

| value                          | meaning                                                        |
|--------------------------------|----------------------------------------------------------------|
| ``None`` / ``"none"``          | random init                                                    |
| ``"imagenet"``                 | Keras's own download and ``$KERAS_HOME/models/`` cache         |
| a path                         | a ``.h5`` / ``.weights.h5`` file of the backbone               |
| ``"source:digits:0-4"``        | a backbone pre-trained here on that embedded task (cached)     |

Here too: the offline transfer story's defaults, the cache folder of pre-trained weights, the
backbone arguments that go with ``source:`` weights and the input size ``image_size="auto"`` picks
for a resolution. ``source:`` weights are trained by ``tlkeras.fitting.pretrain``, whose ``resolve``
is this module's :func:`check` plus that pre-training; ``tlkeras.data.sizing`` reads the resolution.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlkeras.models.backbones import check_file, get_backbone
from tlkeras.models.spec import AugmentConfig

IMAGENET = "imagenet"
SOURCE_PREFIX = "source:"
DEFAULT_SOURCE = "digits:0-4"
DEFAULT_TARGET = "digits:5-9"  # the target of the offline transfer story
DEFAULT_BACKBONE = "MobileNet"
DEFAULT_BACKBONE_KWARGS: dict[str, Any] = {"alpha": 0.25}
# Digits are 8x8 scans. At MobileNet's minimum of 32 px its last blocks see 1x1 maps and the source
# task does not learn (measured: 10 epochs, 20 % validation accuracy, chance); at 64 px it reaches
# 99 % in 10 epochs and transfers to 5-9 (tlkeras.workflows.transfer.train_with_baselines).
DEFAULT_IMAGE_SIZE = 64
# Small shifts and turns, no flips (a flipped digit is another digit or none): the augmentation of
# the source pre-training (tlkeras.fitting.pretrain) and of the digits targets.
PRETRAIN_AUGMENT = AugmentConfig(
    flip="none", rotation=0.05, zoom=0.0, contrast=0.0, translation=0.1
)
# The source pre-training's learning rate, and the fine-tuning one of source: weights.
DEFAULT_LEARNING_RATE = 2e-3
CACHE_SUBDIR = os.path.join("tlkeras", "pretrained")


def cache_root() -> Path:
    """``$KERAS_HOME/tlkeras/pretrained`` (read at call time, like ``keras.utils.get_file``)."""
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        base = base if os.access(base, os.W_OK) else tempfile.gettempdir()
        home = os.path.join(base, ".keras")
    return Path(home) / CACHE_SUBDIR


def parse(text: str | None) -> str | None:
    """The syntax of a ``weights`` value, no file look-up: ``None``/``"none"`` → ``None``,
    ``"ImageNet"`` → ``"imagenet"``, anything else stripped as it is."""
    if text is None or text.strip().lower() in ("", "none", "null", "random"):
        return None
    if text.strip().lower() == IMAGENET:
        return IMAGENET
    return text.strip()


def backbone_kwargs_for(backbone: str, backbone_kwargs: Any, weights: Any = None) -> dict:
    """``backbone_kwargs`` as a dict; ``None`` is none, or with ``source:`` weights the source
    model's (``DEFAULT_BACKBONE_KWARGS`` for ``DEFAULT_BACKBONE``: the main job's width)."""
    if backbone_kwargs is None and is_source(weights):
        default = get_backbone(backbone).name == DEFAULT_BACKBONE
        backbone_kwargs = DEFAULT_BACKBONE_KWARGS if default else {}
    return dict(backbone_kwargs or {})


def is_source(weights: Any) -> bool:
    return isinstance(weights, str) and weights.strip().startswith(SOURCE_PREFIX)


AUTO_SIZE = "auto"
# image_size="auto" for sources smaller than the backbone's default: this many times their short
# side, rounded up to a multiple of 32. Measured on CIFAR-10's 32-px images (BENCHMARKS.md,
# input_size_cifar10; 2 seeds, test accuracy feature_extraction / full): 64 px 60.9 / 64.3 %, 96 px
# 69.0 / 72.4 %, 128 px 70.5 / 73.6 % at 1.2x / 1.35x the time of 96: 96 is the knee.
AUTO_UPSCALE = 3


def auto_image_size(
    resolution: tuple[int, int] | None, backbone: str, weights: Any = None
) -> tuple[int, str]:
    """``(size, why)``: the square input size ``image_size="auto"`` chooses for images of median
    ``resolution`` (``tlkeras.data.source_resolution``) on ``backbone``.

    ``source:`` weights keep the size they were pre-trained at. Sources at least
    ``default_size / AUTO_UPSCALE`` on their short side (photos) get the backbone's default size.
    Smaller ones (CIFAR's 32 px) get ``AUTO_UPSCALE`` times their short side, rounded up to a
    multiple of 32 and at least the backbone's minimum: upscaling 32-px images to 224 costs 49x the
    compute of 32 px for a few points (measured; see ``AUTO_UPSCALE``).
    """
    spec = get_backbone(backbone)
    if is_source(weights):
        return DEFAULT_IMAGE_SIZE, "the size the source: weights were pre-trained at"
    if resolution is None:
        return spec.default_size, f"{spec.name}'s default (the data's resolution is not known)"
    side = min(resolution)
    seen = f"images of median {resolution[0]}x{resolution[1]} px"
    if side * AUTO_UPSCALE >= spec.default_size:
        return spec.default_size, f"{seen}: {spec.name}'s default"
    size = max(spec.min_size, 32 * -(-side * AUTO_UPSCALE // 32))
    return size, (
        f"{seen}: {AUTO_UPSCALE}x their short side, rounded up to a multiple of 32 "
        f"({spec.name}'s default {spec.default_size} would cost "
        f"{(spec.default_size / size) ** 2:.1f}x the compute)"
    )


def check(
    weights: str | os.PathLike | None, input_shape: Sequence[int] | None = None
) -> str | None:
    """A ``weights`` value or flag text checked, in the form ``tlkeras.build_model`` takes, with
    nothing trained: ``None``/``"none"`` → ``None``; ``"imagenet"`` → ``"imagenet"``;
    ``"source:TASK"`` → itself, stripped (``tlkeras.fitting.pretrain.resolve`` turns it into the
    path of a backbone pre-trained on TASK); any other string → an existing file
    (``tlkeras.models.backbones.BadFileError`` when it is truncated or not a weights file).
    """
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"weights: expected 'imagenet', None, 'source:TASK' or a file path, received "
            f"{type(weights).__name__}"
        )
    text = parse(os.fspath(weights))
    if text in (None, IMAGENET):
        return text
    if text.startswith(SOURCE_PREFIX):
        if input_shape is not None and (len(input_shape) != 3 or input_shape[-1] != 3):
            raise ValueError(
                f"input_shape: expected (height, width, 3) for transferred weights, received "
                f"{tuple(input_shape)}"
            )
        return text
    if not Path(text).expanduser().is_file():
        raise FileNotFoundError(
            f"weights: expected 'imagenet', None, 'source:TASK' or an existing weights file, "
            f"received {text!r} (no such file)"
        )
    check_file(Path(text).expanduser(), "weights")  # before any data is loaded
    return str(Path(text).expanduser())
