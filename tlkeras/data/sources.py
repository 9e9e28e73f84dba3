"""Data in: image folders, TFDS datasets, NumPy arrays and the embedded digits set as ``tf.data``.

``load`` turns any supported source into an :class:`ImageData` with a training, a validation (early
stopping / checkpoints) and a held-out test split. Every element is ``(images, labels)`` with images
float32 ``[B, H, W, 3]`` raw pixels in 0–255 resized to ``image_size`` (models built by
``tlkeras.build_model`` preprocess inside) and labels int32 ``[B]`` (float32 multi-hot ``[B, C]`` for
multi-label arrays).

Image folders are scanned *before* training (``tlkeras.data.files.scan_files``): every file's header
is checked against a byte cap and a pixel cap (decompression bombs), and it is decoded once with the
very op the input pipeline uses. Files that cannot be used are skipped and listed with the reason, so an
epoch never crashes on a bad file; ``max_bad_fraction`` turns a mostly-broken folder into an error.

Decoded images are cached after their first pass: in memory up to ``DataConfig.memory_cache_mib``
(smallest splits first), past it in a file cache in a temporary directory, filled at load, so memory
stays flat as a folder grows.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tlkeras import checks, progress
from tlkeras.data.config import AUTOTUNE, SPLITS, DataConfig, ImageData, is_digits
from tlkeras.data.files import folder_layout
from tlkeras.data.pools import Pool, folder_pool, source_pool

logger = logging.getLogger(__name__)

# Decoded images per step while a file cache fills.
FILL_BATCH = 256


# --------------------------------------------------------------------------------------------------
# Splitting and the input pipeline.


def _split(pool: Pool, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Stratified (single-label) or random (multi-label) split of the pool into named index sets;
    each fraction is of the whole pool, the rest is ``train``."""
    from sklearn.model_selection import train_test_split

    remaining = np.arange(len(pool))
    left = 1.0
    out = {}
    for name, fraction in fractions.items():
        if fraction <= 0:
            continue
        stratify = None if pool.multilabel else pool.labels[remaining]
        try:
            rest, held = train_test_split(
                remaining, test_size=fraction / left, random_state=seed, stratify=stratify
            )
        except ValueError as e:
            counts = Counter(pool.labels[remaining].tolist()) if not pool.multilabel else {}
            smallest = sorted(counts.items(), key=lambda kv: kv[1])[:3]
            described = ", ".join(f"{pool.class_names[c]!r}: {n}" for c, n in smallest)
            raise ValueError(
                f"cannot split {len(remaining)} examples stratified by class for {name} "
                f"({', '.join(f'{k}={v}' for k, v in fractions.items())}): expected enough images "
                f"per class for every split, received smallest classes {described} "
                f"({e}). Add images, drop tiny classes, lower the fractions, or pass validation data."
            ) from None
        out[name] = np.sort(held)
        remaining = np.sort(rest)
        left -= fraction
    out["train"] = remaining
    return out


def splits_in_memory(sizes: dict[str, int], config: DataConfig) -> set[str]:
    """The splits whose decoded images fit in ``config.memory_cache_mib``, smallest first."""
    height, width = config.image_size
    budget, kept = config.memory_cache_mib * 2**20, set()
    for split, n in sorted(sizes.items(), key=lambda kv: kv[1]):
        if n * height * width * 3 <= budget:
            budget -= n * height * width * 3
            kept.add(split)
    return kept


def _file_cache(ds: tf.data.Dataset, split: str, size: int) -> tf.data.Dataset:
    """``ds`` cached in a file of a temporary directory (removed at exit), filled now: every later
    pass only reads it, and no two passes ever race to write it."""
    directory = tempfile.mkdtemp(prefix="tlkeras_decoded_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    ds = ds.cache(os.path.join(directory, split))
    count = progress.Progress(size, f"Decoding {split} images into a file cache", "images")
    done = 0
    for batch in ds.batch(FILL_BATCH).map(lambda x, *_: tf.shape(x)[0]):
        done += int(batch)
        count.update(done)
    count.close()
    return ds


def _pipeline(
    ds: tf.data.Dataset, config: DataConfig, training: bool, size: int, cache_file: str = ""
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """decoded uint8 elements → cache → (shuffle) → batch → float32 → prefetch; also the same
    without the shuffle (for training: ``ImageData.ordered``), reading the same cache (in memory,
    or in a file for ``cache_file``, the split's name)."""
    if config.cache and cache_file:
        ds = _file_cache(ds, cache_file, size)
    elif config.cache:
        ds = ds.cache()

    def batched(ds: tf.data.Dataset) -> tf.data.Dataset:
        ds = ds.batch(config.batch_size)
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE)

    ordered = batched(ds)
    if not training:
        return ordered, ordered
    buffer = max(1, min(config.shuffle_buffer, size))
    return batched(ds.shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True)), ordered


def _counts(pool: Pool, idx: np.ndarray) -> dict[str, int]:
    labels = pool.labels[idx]
    if pool.multilabel:
        per_class = (
            labels.sum(axis=0).astype(int) if len(idx) else np.zeros(len(pool.class_names), int)
        )
    else:
        per_class = np.bincount(labels, minlength=len(pool.class_names))
    return {c: int(n) for c, n in zip(pool.class_names, per_class, strict=True)}


def load(
    source: Any,
    *,
    validation: Any = None,
    config: DataConfig | None = None,
    class_names: Sequence[str] | None = None,
    **config_overrides: Any,
) -> ImageData:
    """Load an image classification dataset as batched ``tf.data`` splits.

    Args:
        source: a folder with one subfolder per class (or with ``train/`` and optional
            ``val/``|``validation/`` and ``test/`` folders inside); ``"tfds:NAME[/CONFIG][:SPLIT]"``
            (split defaults to ``train``); a tuple ``(x, y)`` of NumPy arrays (x uint8/float 0–255
            ``[N, H, W, C]`` with C in {1, 3}; y class ids ``[N]`` or multi-hot ``[N, C]``); or
            ``"digits"`` / ``"digits:A-B"``, scikit-learn's bundled 8x8 digits (the offline default).
        validation: validation data in any of the forms above (a TFDS split such as
            ``"tfds:tf_flowers:train[80%:]"``). When given, only the test split is carved from
            ``source``.
        config: a ``DataConfig``; keyword overrides (``image_size=(64, 64)``, ``seed=1``…) apply
            on top of it.
        class_names: names for array labels (default ``"0"``, ``"1"``…).

    Splits are stratified by class with ``seed`` (multi-label arrays: a random split); a class too
    small to be split raises ``ValueError``. Folder files are checked before training and unusable
    ones are skipped and listed (``ImageData.skipped``); more than ``max_bad_fraction`` bad files
    raises ``ValueError``. An empty class folder is left out of the classes with a warning in
    ``ImageData.warnings`` and the summary. Fewer than 2 classes raise ``ValueError``.
    """
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(config_overrides) - fields)
    if unknown:
        raise TypeError(f"load(): expected DataConfig options {sorted(fields)}, received {unknown}")
    if config is not None:
        checks.instance("config", config, DataConfig, "a DataConfig")
    config = dataclasses.replace(config or DataConfig(), **config_overrides)

    pool, given = _pools(source, validation, config, class_names)
    all_pools = [pool, *given.values()]
    skipped = _check_pools(pool, all_pools, config)
    fractions = {
        "test": 0.0 if "test" in given else config.test_split,
        "validation": 0.0 if "validation" in given else config.validation_split,
    }
    indices = _split(pool, fractions, config.seed)
    sizes = {
        s: len(given[s]) if s in given else len(indices[s])
        for s in SPLITS
        if s in given or s in indices
    }
    in_memory = splits_in_memory(sizes, config)
    datasets: dict[str, tf.data.Dataset | None] = {}
    counts: dict[str, dict[str, int]] = {}
    items: dict[str, list[str]] = {}
    for split in SPLITS:
        if split in given:
            p, idx = given[split], np.arange(len(given[split]))
        elif split in indices:
            p, idx = pool, indices[split]
        else:
            datasets[split] = None
            continue
        if split == "train":
            # A folder lists its files class by class, and the shuffle buffer is far smaller than
            # a medium data set: without a seeded permutation first, batches came one or two
            # classes at a time and end-to-end fine-tuning chased the current class (measured on
            # CIFAR-10, 6,000 training images: 5.4 of 10 classes per batch, validation accuracy
            # 0.69 -> 0.50 after one epoch). Keras's image_dataset_from_directory does the same.
            idx = np.random.default_rng(config.seed).permutation(idx)
        datasets[split], ordered = _pipeline(
            p.make(idx), config, split == "train", len(idx), "" if split in in_memory else split
        )
        if split == "train":
            train_ordered = ordered
        counts[split] = _counts(p, idx)
        items[split] = [p.names[i] for i in idx] if p.names else [f"index {i}" for i in idx]
    return ImageData(
        train=datasets["train"],
        validation=datasets["validation"],
        test=datasets["test"],
        class_names=list(pool.class_names),
        counts=counts,
        skipped=skipped,
        source=pool.source,
        multilabel=pool.multilabel,
        notes=[n for p in all_pools for n in p.notes],
        ignored=sum(p.ignored for p in all_pools),
        warnings=[w for p in all_pools for w in p.warnings],
        image_size=config.image_size,
        items=items,
        origin=_origin(source, validation, config),
        _train_ordered=train_ordered,
    )


def _origin(source: Any, validation: Any, config: DataConfig) -> dict[str, Any] | None:
    """``load``'s arguments as JSON, when the sources are text (folders, ``tfds:``, ``digits``):
    a run's report can then be rebuilt from ``metrics.json`` alone."""
    texts = (str, os.PathLike)
    if not isinstance(source, texts) or not (validation is None or isinstance(validation, texts)):
        return None

    def text(value: Any) -> str | None:  # folders absolute: a report may be rebuilt elsewhere
        if value is None:
            return None
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else str(value)

    return {
        "source": text(source),
        "validation": text(validation),
        "config": {**dataclasses.asdict(config), "image_size": list(config.image_size)},
    }


def _pools(
    source: Any, validation: Any, config: DataConfig, class_names: Sequence[str] | None
) -> tuple[Pool, dict[str, Pool]]:
    """The pool to split and the splits given whole (``train/val/test`` folders, ``validation=``)."""
    given: dict[str, Pool] = {}
    layout = None
    if isinstance(source, str | os.PathLike) and not (
        str(source).startswith("tfds:") or is_digits(str(source))
    ):
        path = Path(source).expanduser()
        if path.is_dir():
            layout = folder_layout(path)
    if layout is not None:
        pool = folder_pool(layout["train"], config, display=Path(source).expanduser())
        for split in ("validation", "test"):
            if split in layout:
                given[split] = folder_pool(
                    layout[split], config, pool.class_names, display=Path(source).expanduser()
                )
        pool.source = str(Path(source).expanduser())
    else:
        pool = source_pool(source, config, given_names=class_names)
    if validation is not None:
        if "validation" in given:
            raise ValueError(
                f"validation: expected validation data once, received both validation= and a "
                f"validation folder in {str(source)!r}"
            )
        given["validation"] = source_pool(validation, config, class_names=pool.class_names)

    return pool, given


def _check_pools(pool: Pool, all_pools: list[Pool], config: DataConfig) -> list:
    """The skipped files of every pool; too many, or fewer than 2 classes with images, raise."""
    scanned = sum(p.scanned for p in all_pools)
    skipped = [s for p in all_pools for s in p.skipped]
    if scanned and len(skipped) > config.max_bad_fraction * scanned:
        reasons = Counter(s.reason.split(":")[0] for s in skipped).most_common()
        raise ValueError(
            f"expected at most {config.max_bad_fraction:.0%} unusable files, received "
            f"{len(skipped)} of {scanned} ("
            + "; ".join(f"{n} {r}" for r, n in reasons)
            + "). Raise max_bad_fraction to train on the rest."
        )

    present = (
        pool.labels.sum(axis=0) > 0
        if pool.multilabel
        else np.bincount(pool.labels, minlength=1) > 0
    )
    if int(np.sum(present)) < 2:
        raise ValueError(
            f"expected at least 2 classes with images, received {int(np.sum(present))} "
            f"({pool.class_names}) in {pool.source}"
        )
    if skipped:
        logger.warning(
            "tlkeras.data.sources: skipped %d of %d files (%s); see ImageData.skipped / summary()",
            len(skipped),
            scanned,
            "; ".join(
                f"{n} {r}" for r, n in Counter(s.reason.split(":")[0] for s in skipped).items()
            ),
        )
    return skipped
