"""The feature cache: what the frozen prefix computes, computed once per image.

``cache_features`` runs the prefix of ``tlkeras.fitting.frozen.split_at_block`` once over a dataset
(the clean view, and augmented views through the model's augmentation layer when asked) and returns a
dataset of its outputs that draws one view per image on every pass; ``feature_arrays`` keeps them in
NumPy arrays (``CachedArrays``) when they fit in ``MEMORY_FRACTION`` of the available RAM, else
``cache_features`` caches them to files. ``tlkeras.fitting.fast_path`` trains on them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import checks, progress

logger = logging.getLogger(__name__)

# Features are kept in memory up to this fraction of the available RAM, else cached to a file.
MEMORY_FRACTION = 0.25


def _split_element(element: Any) -> tuple[Any, tuple[Any, ...]]:
    if not isinstance(element, (tuple, list)) or len(element) < 2:
        raise ValueError(
            "expected a dataset of (images, labels) or (images, labels, sample_weights) batches, "
            f"received elements of type {type(element).__name__}"
        )
    return element[0], tuple(element[1:])


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported platform: assume a modest machine
        return 4 << 30


def cache_features(
    prefix: keras.Model,
    dataset: tf.data.Dataset,
    *,
    views: int = 1,
    augmentation: keras.layers.Layer | None = None,
    seed: int = 0,
    shuffle: bool = False,
    cache_dir: str | Path | None = None,
) -> tf.data.Dataset:
    """Run the frozen ``prefix`` once over ``dataset`` and return a dataset of its outputs.

    View 0 is the clean image; views 1..``views``-1 pass the images through ``augmentation`` in
    training mode first. The returned dataset yields ``(features, *rest)`` batches of the input's
    batch size (``rest``: labels and optional sample weights, unchanged) and, with several views,
    picks one view per image at random on every pass (every epoch). Features are float32 (parity
    with the full model) and kept in memory when they fit in ``MEMORY_FRACTION`` of the available
    RAM; otherwise (or when ``cache_dir`` is given) each view is cached to a file there.

    Args:
        prefix: from ``split_at_block``; frozen.
        dataset: batched ``(images, labels[, sample_weights])``.
        views: total views per image, >= 1 (1: clean only).
        augmentation: the model's augmentation layer; required when ``views > 1``.
        seed: seeds the view sampling and the shuffling.
        shuffle: reshuffle the examples on every pass (for training data).
        cache_dir: directory for file caches instead of memory.

    Returns:
        A ``tf.data.Dataset``.
    """
    checks.integer("views", views, 1)
    if views > 1 and augmentation is None:
        raise ValueError(f"expected an augmentation layer for views={views}, received None")
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"expected a tf.data.Dataset, received {type(dataset).__name__}")

    if cache_dir is None:
        cached = feature_arrays(prefix, dataset, views=views, augmentation=augmentation)
        if cached is not None:
            return cached.dataset(seed=seed, shuffle=shuffle)
    # File-backed: one cached pass per view, zipped so the same example lines up across views.
    features = _features_fn(prefix, augmentation)

    directory = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="tlkeras_features_"))
    directory.mkdir(parents=True, exist_ok=True)
    unbatched = []
    for v in range(views):
        ds = dataset.map(
            lambda *e, v=v: (features(e[0], v > 0),) + tuple(e[1:]),
            num_parallel_calls=1,
            deterministic=True,
        )
        ds = ds.unbatch().cache(str(directory / f"view{v}"))
        for _ in ds:  # fill the cache now: cost is paid once, here
            pass
        unbatched.append(ds)
    batch_size = batch_size_of(dataset)
    feats = [ds.map(lambda *e: e[0]) for ds in unbatched]
    labels = unbatched[0].map(lambda *e: tuple(e[1:]))
    n = int(unbatched[0].reduce(0, lambda c, _: c + 1))
    return _sample_views(feats, labels, n=n, batch_size=batch_size, seed=seed, shuffle=shuffle)


@dataclass(frozen=True)
class CachedArrays:
    """Cached features in memory: ``views[v]`` holds view ``v`` of every example (view 0 clean),
    ``rest`` the labels (and sample weights) in the same order, ``batch_size`` the input's."""

    views: list[Any]
    rest: tuple[np.ndarray, ...]
    batch_size: int

    def dataset(self, *, seed: int = 0, shuffle: bool = False, views: int | None = None):
        """Batches of ``(features, *rest)``, one view (of the first ``views``) drawn per example."""
        return _sample_arrays(
            self.views[:views], self.rest, batch_size=self.batch_size, seed=seed, shuffle=shuffle
        )


def _features_fn(prefix: keras.Model, augmentation: keras.layers.Layer | None) -> Callable:
    fn = _feature_function(prefix, augmentation)

    def features(images: tf.Tensor, augment: bool) -> Any:
        out = fn(images, tf.constant(augment))
        # tf.data reads a list as one tensor to stack; several boundary tensors are a tuple.
        return tuple(out) if isinstance(out, list) else out

    return features


def feature_arrays(
    prefix: keras.Model,
    dataset: tf.data.Dataset,
    *,
    views: int = 1,
    augmentation: keras.layers.Layer | None = None,
) -> CachedArrays | None:
    """Run ``prefix`` once per view over ``dataset`` into NumPy arrays (see ``cache_features``);
    ``None`` when they would exceed ``MEMORY_FRACTION`` of the available RAM."""
    features = _features_fn(prefix, augmentation)
    per_view: list[list[Any]] = [[] for _ in range(views)]
    rest: list[tuple[Any, ...]] = []
    budget, used, batch_size = MEMORY_FRACTION * _available_memory(), 0, 0
    count = progress.Progress(max(int(dataset.cardinality()), 0), "Caching features", "batches")
    for element in dataset:
        count.update(count.done + 1)
        images, extra = _split_element(element)
        batch_size = batch_size or int(tf.shape(images)[0])
        for v in range(views):
            out = tf.nest.map_structure(lambda t: t.numpy(), features(images, v > 0))
            per_view[v].append(out)
            used += sum(a.nbytes for a in tf.nest.flatten(out))
        rest.append(tuple(np.asarray(e) for e in extra))
        if used > budget:
            logger.warning(
                "cached features exceed %.0f MiB of memory; caching to files instead",
                budget / 2**20,
            )
            return None
    count.close()
    if not rest:
        raise ValueError("expected a non-empty dataset, received one with no batches")
    stacked = [
        tf.nest.map_structure(lambda *a: np.concatenate(a), *batches) for batches in per_view
    ]
    labels = tuple(np.concatenate(parts) for parts in zip(*rest, strict=True))
    return CachedArrays(stacked, labels, batch_size)


def _feature_function(prefix: keras.Model, augmentation: keras.layers.Layer | None) -> Any:
    """Compiled ``prefix`` on ``(images, augment)``, traced once for any batch size and for both
    the clean and the augmented views (a ``tf.cond`` picks the input; the backbone is traced once).

    Kept on the prefix so the training and validation passes share one trace: tracing costs about
    as much as a forward pass over a small dataset. No autograph: Keras layers need none, and
    converting every call in the backbone made the trace several times slower.
    """
    cache = getattr(prefix, "_tlkeras_feature_fns", None)
    if cache is None:
        cache = {}
        object.__setattr__(prefix, "_tlkeras_feature_fns", cache)
    # A clean-only caller reuses the function of an augmenting one (with augment=False).
    if "fn" in cache and (augmentation is None or cache["augmentation"] is augmentation):
        return cache["fn"]

    def run(images: tf.Tensor, augment: tf.Tensor) -> Any:
        if augmentation is not None:
            images = tf.cond(augment, lambda: augmentation(images, training=True), lambda: images)
        return prefix(images, training=False)

    spec = [
        tf.TensorSpec(prefix.inputs[0].shape, prefix.inputs[0].dtype),
        tf.TensorSpec([], tf.bool),
    ]
    cache["augmentation"] = augmentation
    cache["fn"] = tf.function(run, input_signature=spec, autograph=False)
    return cache["fn"]


def _sample_arrays(
    views: Sequence[Any],
    labels: tuple[np.ndarray, ...],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
) -> tf.data.Dataset:
    """``_sample_views`` for features in memory, a batch at a time: an epoch of a small head costs
    milliseconds, so per-example ``tf.data`` work would dominate it."""
    n = len(labels[0])
    # One tensor per structure leaf, [views, n, ...]: a batch is a single gather.
    stacked = tf.nest.map_structure(lambda *a: tf.constant(np.stack(a)), *views)
    rest = tuple(tf.constant(a) for a in labels)
    count = len(views)
    index = tf.data.Dataset.range(n)
    if shuffle:
        index = index.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    index = index.batch(batch_size)
    # A fresh random view per example on every pass over the data.
    pick = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(batch_size)

    def gather(i: tf.Tensor, r: tf.Tensor) -> tuple[Any, ...]:
        r = r[: tf.shape(i)[0]]
        where = tf.stack([tf.cast(r % count, tf.int64), i], axis=1)
        features = tf.nest.map_structure(lambda t: tf.gather_nd(t, where), stacked)
        return (features, *(tf.gather(t, i) for t in rest))

    return tf.data.Dataset.zip((index, pick)).map(gather).prefetch(tf.data.AUTOTUNE)


def _sample_views(
    views: Sequence[tf.data.Dataset],
    labels: tf.data.Dataset,
    *,
    n: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
) -> tf.data.Dataset:
    if len(views) == 1:
        ds = tf.data.Dataset.zip((views[0], labels)).map(lambda f, r: (f,) + tuple(r))
    else:
        # A fresh random view per example on every pass over the data.
        pick = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        count = len(views)

        def choose(r: tf.Tensor, fs: tuple[Any, ...], rest: tuple[Any, ...]) -> tuple[Any, ...]:
            i = tf.cast(r % count, tf.int32)
            branches = [lambda f=f: f for f in fs]
            return (tf.switch_case(i, branches),) + tuple(rest)

        ds = tf.data.Dataset.zip((pick, tuple(views), labels)).map(
            choose, num_parallel_calls=tf.data.AUTOTUNE
        )
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def batch_size_of(dataset: tf.data.Dataset) -> int:
    """The batch size of ``dataset``'s first batch."""
    images, _ = _split_element(next(iter(dataset)))
    return int(tf.shape(images)[0])
