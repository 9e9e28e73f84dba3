"""Weights: the one place a ``weights`` value is understood, and the offline source task.

``resolve`` turns what a user writes into what ``tlkeras.build_model`` takes:

| value                          | meaning                                                        |
|--------------------------------|----------------------------------------------------------------|
| ``None`` / ``"none"``          | random init                                                    |
| ``"imagenet"``                 | Keras's own download and ``$KERAS_HOME/models/`` cache         |
| a path                         | a ``.h5`` / ``.weights.h5`` file of the backbone               |
| ``"source:digits:0-4"``        | a backbone pre-trained here on that embedded task (cached)     |

``pretrained_weights("digits:0-4")`` trains a small backbone from scratch on the digits 0–4 (real
scikit-learn scans, no download), saves the backbone's weights under ``$KERAS_HOME/tlkeras/pretrained``
keyed by its arguments, and reuses them on later calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlkeras.data.sources import DIGITS, load, source_resolution
from tlkeras.fitting.phase import SCRATCH, Phase, run_phase
from tlkeras.models.backbones import check_file, file_problem, get_backbone
from tlkeras.models.builder import HeadConfig, build_model
from tlkeras.models.spec import AugmentConfig
from tlkeras.models.task import encode_labels

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
DEFAULT_PRETRAIN_EPOCHS = 20
# Small shifts and turns, no flips (a flipped digit is another digit or none).
PRETRAIN_AUGMENT = AugmentConfig(
    flip="none", rotation=0.05, zoom=0.0, contrast=0.0, translation=0.1
)
# From scratch the weights move fast; Keras's default moving-average momentum (0.99) lags them and
# the inference-mode model scores at chance while the training-mode one is right (measured: 20 %
# vs 87 % after 10 epochs). 0.9 follows the weights.
PRETRAIN_BN_MOMENTUM = 0.9
DEFAULT_LEARNING_RATE = 2e-3
DEFAULT_BATCH_SIZE = 32
CACHE_SUBDIR = os.path.join("tlkeras", "pretrained")
# Bump when the pre-training recipe changes, so stale cached weights are not reused.
_RECIPE_VERSION = 3


def cache_root() -> Path:
    """``$KERAS_HOME/tlkeras/pretrained`` (read at call time, like ``keras.utils.get_file``)."""
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        base = base if os.access(base, os.W_OK) else tempfile.gettempdir()
        home = os.path.join(base, ".keras")
    return Path(home) / CACHE_SUBDIR


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, received {value!r}")
    return value


def _check_source(source: Any) -> str:
    if not isinstance(source, str) or not re.fullmatch(rf"{DIGITS}(:\d-\d)?", source.strip()):
        raise ValueError(
            f"source: expected an embedded source task such as 'digits' or 'digits:0-4', "
            f"received {source!r}"
        )
    return source.strip()


def _cache_key(**fields: Any) -> str:
    text = json.dumps({**fields, "recipe": _RECIPE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pretrained_weights(
    source: str = DEFAULT_SOURCE,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    epochs: int | None = None,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    verbose: int = 0,
    progress: bool = False,
) -> Path:
    """A backbone pre-trained from scratch on ``source``, as a ``.weights.h5`` file (cached).

    The file lives in ``cache_dir`` (default ``$KERAS_HOME/tlkeras/pretrained``) under a name keyed
    by every argument, so a second call with the same arguments returns at once. Next to it, a
    ``.json`` records the recipe and the source validation accuracy. Convolutional weights do not
    depend on the input size, so the weights transfer to models of any input size.

    Args:
        source: an embedded task, ``"digits"`` or ``"digits:A-B"``.
        backbone: a ``tlkeras.backbone_names()`` entry.
        backbone_kwargs: constructor arguments (``None``: ``DEFAULT_BACKBONE_KWARGS`` for the
            default backbone, else none).
        image_size: square training size; raised to the backbone's minimum.
        epochs: pre-training epochs (``None``: ``DEFAULT_PRETRAIN_EPOCHS``).
        seed: seeds Keras (Python, NumPy, TF) and the data split before training.
        cache_dir: where to keep the weights.
        verbose: Keras verbosity of the pre-training fit.
        progress: print what is pre-trained and one line per epoch (a first run waits on it).

    Returns:
        The path of the backbone weights, for ``tlkeras.build_model(..., weights=path)``.
    """
    source = _check_source(source)
    spec = get_backbone(backbone)
    if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
        raise TypeError(
            f"backbone_kwargs: expected a dict, received {type(backbone_kwargs).__name__}"
        )
    backbone_kwargs = backbone_kwargs_for(spec.name, backbone_kwargs, SOURCE_PREFIX + source)
    size = max(_check_positive_int("image_size", image_size), spec.min_size)
    epochs = _check_positive_int("epochs", DEFAULT_PRETRAIN_EPOCHS if epochs is None else epochs)
    directory = Path(cache_dir) if cache_dir is not None else cache_root()
    key = _cache_key(
        source=source,
        backbone=spec.name,
        kwargs=backbone_kwargs,
        size=size,
        epochs=epochs,
        seed=seed,
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source).strip("-")
    path = directory / f"{spec.name}_{slug}_{size}px_{key}.weights.h5"
    if path.is_file() and file_problem(path) is None:  # a damaged cache file is made again
        return path

    directory.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    data = load(
        source,
        image_size=(size, size),
        batch_size=DEFAULT_BATCH_SIZE,
        seed=seed,
        validation_split=0.1,
        test_split=0.0,
    )
    model = build_model(
        spec.name,
        len(data.class_names),
        strategy="scratch",
        weights=None,
        input_shape=(size, size, 3),
        backbone_kwargs=backbone_kwargs,
        head=HeadConfig(dropout=0.1),
        augment=dataclasses.replace(PRETRAIN_AUGMENT, seed=seed),
    )
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = PRETRAIN_BN_MOMENTUM
    # Pre-training is a scratch phase like any other (tlkeras.fitting.phase): Adam (no weight decay).
    phase = Phase("source pre-training", SCRATCH, None, DEFAULT_LEARNING_RATE, epochs)
    train, validation = (
        encode_labels(d, "multiclass", len(data.class_names)) for d in (data.train, data.validation)
    )
    callbacks = [_Progress(source, epochs)] if progress else []
    if progress:
        print(
            f"Pre-training {spec.name} {backbone_kwargs or ''} from scratch on the source task "
            f"{source} at {size} px for {epochs} epochs (once; cached in {directory})",
            flush=True,
        )
    result = run_phase(
        model, phase, train, validation, callbacks=callbacks, seed=seed, verbose=verbose
    )
    history, seconds = result.history, result.seconds
    # Write next to the target and rename: a crash or a concurrent run never leaves half a file.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.weights.h5")
    model.get_layer("backbone").save_weights(tmp)
    os.replace(tmp, path)
    record = {
        "source": source,
        "backbone": spec.name,
        "backbone_kwargs": backbone_kwargs,
        "image_size": size,
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(seconds, 2),
        "source_val_accuracy": float(history.history["val_accuracy"][-1]),
        "class_names": data.class_names,
    }
    path.with_suffix("").with_suffix(".json").write_text(json.dumps(record, indent=2))
    return path


class _Progress(keras.callbacks.Callback):
    """One line per source pre-training epoch."""

    def __init__(self, source: str, epochs: int) -> None:
        super().__init__()
        self._source, self._epochs = source, epochs

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        print(
            f"  source {self._source}: epoch {epoch + 1}/{self._epochs} "
            f"loss {logs.get('loss', float('nan')):.3f} "
            f"validation accuracy {logs.get('val_accuracy', float('nan')):.3f}",
            flush=True,
        )


def pretrained_record(path: str | Path) -> dict[str, Any]:
    """The JSON record written next to ``pretrained_weights``'s file (empty if missing)."""
    record = Path(path).with_suffix("").with_suffix(".json")
    return json.loads(record.read_text()) if record.is_file() else {}


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


def image_size_for(
    image_size: Any, weights: Any, backbone: str, data_source: Any = None
) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``. ``None`` or ``"auto"``: :func:`auto_image_size` from
    ``data_source``'s resolution (the backbone's default when it is not given or not known)."""
    return choose_image_size(image_size, weights, backbone, data_source)[0]


def choose_image_size(
    image_size: Any, weights: Any, backbone: str, data_source: Any = None
) -> tuple[tuple[int, int], str | None]:
    """:func:`image_size_for` and why it chose that size (``None`` when ``image_size`` was given)."""
    why = None
    if image_size is None or image_size == AUTO_SIZE:
        resolution = None
        if data_source is not None and not is_source(weights):
            resolution = source_resolution(data_source)
        image_size, why = auto_image_size(resolution, backbone, weights)
    if isinstance(image_size, str) and image_size.strip().isdigit():
        image_size = int(image_size)
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (int(image_size), int(image_size))
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in image_size)
    ):
        raise ValueError(
            f"image_size: expected 'auto', a positive int or (height, width), received "
            f"{image_size!r}"
        )
    return (int(image_size[0]), int(image_size[1])), why


def resolve(
    weights: str | os.PathLike | None,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    *,
    progress: bool = False,
) -> str | None:
    """Turn a ``weights`` value or flag text into what ``tlkeras.build_model`` takes.

    ``None``/``"none"`` → ``None``; ``"imagenet"`` → ``"imagenet"``; ``"source:TASK"`` (e.g.
    ``"source:digits:0-4"``) → the path of a backbone pre-trained on TASK (``pretrained_weights``,
    at ``DEFAULT_IMAGE_SIZE``; the weights fit any input size); any other string → an existing file
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
        return str(
            pretrained_weights(
                text[len(SOURCE_PREFIX) :], backbone, backbone_kwargs, progress=progress
            )
        )
    if not Path(text).expanduser().is_file():
        raise FileNotFoundError(
            f"weights: expected 'imagenet', None, 'source:TASK' or an existing weights file, "
            f"received {text!r} (no such file)"
        )
    check_file(Path(text).expanduser(), "weights")  # before any data is loaded
    return str(Path(text).expanduser())
