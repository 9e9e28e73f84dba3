"""Source pre-training: a backbone trained here from scratch on an embedded task, cached, and
``resolve``, which turns any ``weights`` value into what ``tlkeras.build_model`` takes, pre-training
``source:`` weights on demand.

``pretrained_weights("digits:0-4")`` trains a small backbone from scratch on the digits 0–4 (real
scikit-learn scans, no download), saves the backbone's weights under ``$KERAS_HOME/tlkeras/pretrained``
keyed by its arguments, and reuses them on later calls. Parsing and checking ``weights`` values
without training is ``tlkeras.models.weights``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from tlkeras import checks
from tlkeras.data import DIGITS, load
from tlkeras.fitting.config import SCRATCH, Phase, set_seed
from tlkeras.fitting.runner import run_phase
from tlkeras.models.backbones import file_problem, get_backbone
from tlkeras.models.builder import HeadConfig, build_model
from tlkeras.models.task import encode_labels
from tlkeras.models.weights import (
    DEFAULT_BACKBONE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_LEARNING_RATE,
    DEFAULT_SOURCE,
    PRETRAIN_AUGMENT,
    SOURCE_PREFIX,
    backbone_kwargs_for,
    cache_root,
    check,
    is_source,
)

DEFAULT_PRETRAIN_EPOCHS = 20
# From scratch the weights move fast; Keras's default moving-average momentum (0.99) lags them and
# the inference-mode model scores at chance while the training-mode one is right (measured: 20 %
# vs 87 % after 10 epochs). 0.9 follows the weights.
PRETRAIN_BN_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 32
# Bump when the pre-training recipe changes, so stale cached weights are not reused.
_RECIPE_VERSION = 3


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
    if backbone_kwargs is not None:
        checks.instance("backbone_kwargs", backbone_kwargs, dict, "a dict")
    backbone_kwargs = backbone_kwargs_for(spec.name, backbone_kwargs, SOURCE_PREFIX + source)
    size = max(checks.positive_int("image_size", image_size), spec.min_size)
    epochs = checks.positive_int("epochs", DEFAULT_PRETRAIN_EPOCHS if epochs is None else epochs)
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
    set_seed(seed)
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
    # Pre-training is a scratch phase like any other (tlkeras.fitting.runner): Adam (no weight decay).
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
    resolved = check(weights, input_shape)
    if is_source(resolved):
        return str(
            pretrained_weights(
                resolved[len(SOURCE_PREFIX) :], backbone, backbone_kwargs, progress=progress
            )
        )
    return resolved
