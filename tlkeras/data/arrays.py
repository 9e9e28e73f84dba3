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

    ``map_images`` turns each image batch into what is kept (a model's outputs, small grey pixels),
    or into a tuple of such arrays (a model's outputs and its features): ``x`` is then a tuple of
    arrays. ``limit`` stops after that many rows; ``dtype`` casts the kept rows. Raises
    ``ValueError`` on no batch at all, which otherwise surfaces as NumPy's "need at least one array".
    """
    if not isinstance(datasets, list | tuple):
        datasets = [datasets]
    xs, ys, n, several = [], [], 0, False
    for dataset in _present(datasets):
        for images, labels in dataset:
            kept = images if map_images is None else map_images(images)
            several = isinstance(kept, tuple | list)
            xs.append([np.asarray(k, dtype=dtype) for k in (kept if several else [kept])])
            ys.append(np.asarray(labels))
            n += len(ys[-1])
            if limit is not None and n >= limit:
                break
        if limit is not None and n >= limit:
            break
    if not ys:
        raise ValueError("expected a non-empty dataset, received 0 batches")
    parts = tuple(np.concatenate(part)[:limit] for part in zip(*xs, strict=True))
    return (parts if several else parts[0]), np.concatenate(ys)[:limit]


def _present(datasets: Iterable[Any]) -> list[Any]:
    return [d for d in datasets if d is not None]
