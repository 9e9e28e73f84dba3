"""Datasets to NumPy: the one loop that turns ``(images, labels)`` batches into two arrays."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def dataset_arrays(
    datasets: Any,
    *,
    map_images: Callable[[Any], Any] | None = None,
    limit: int | None = None,
    dtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: every ``(images, labels)`` batch of ``datasets`` (one dataset, or several read in
    order; ``None`` entries skipped) concatenated, in dataset order.

    ``map_images`` turns each image batch into what is kept (a model's outputs, small grey pixels);
    ``limit`` stops after that many rows; ``dtype`` casts the kept rows. Raises ``ValueError`` on
    no batch at all, which otherwise surfaces as NumPy's "need at least one array".
    """
    if not isinstance(datasets, list | tuple):
        datasets = [datasets]
    xs, ys, n = [], [], 0
    for dataset in _present(datasets):
        for images, labels in dataset:
            kept = images if map_images is None else map_images(images)
            xs.append(np.asarray(kept, dtype=dtype))
            ys.append(np.asarray(labels))
            n += len(ys[-1])
            if limit is not None and n >= limit:
                return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]
    if not ys:
        raise ValueError("expected a non-empty dataset, received 0 batches")
    return np.concatenate(xs), np.concatenate(ys)


def _present(datasets: Iterable[Any]) -> list[Any]:
    return [d for d in datasets if d is not None]
