"""The input size ``image_size="auto"`` picks: the median resolution of a source's images
(:func:`source_resolution`) fed to ``tlkeras.models.weights.auto_image_size``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras.data.config import is_digits
from tlkeras.data.files import folder_layout, walk_files
from tlkeras.models.weights import AUTO_SIZE, auto_image_size, is_source

RESOLUTION_SAMPLE = 256  # files whose headers source_resolution reads (seeded sample)


def source_resolution(
    source: Any, *, sample: int = RESOLUTION_SAMPLE, seed: int = 0
) -> tuple[int, int] | None:
    """The median ``(height, width)`` of ``source``'s images before any resizing, or ``None`` when
    it cannot be told cheaply (a TFDS set, an unreadable folder).

    A folder is judged from the headers of a seeded sample of ``sample`` files (no decoding:
    milliseconds); arrays from their shape; the embedded digits are 8x8. ``image_size="auto"``
    (:func:`image_size_for`) uses it to pick an input size.
    """
    if isinstance(source, tuple) and len(source) == 2 and hasattr(source[0], "shape"):
        shape = np.shape(source[0])
        return (int(shape[1]), int(shape[2])) if len(shape) >= 3 else None
    if not isinstance(source, str | os.PathLike):
        return None
    if is_digits(str(source)):
        return (8, 8)
    path = Path(source).expanduser()
    if str(source).startswith("tfds:") or not path.is_dir():
        return None
    layout = folder_layout(path) or {"train": path}
    try:
        files = walk_files(str(layout["train"]))[0]
    except ValueError:
        return None
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(files), min(sample, len(files)), replace=False) if files else []
    from PIL import Image

    sizes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for i in chosen:
            try:
                with Image.open(files[i]) as image:  # reads the header only
                    sizes.append((image.height, image.width))
            except Exception:  # not an image, or a bomb: the scan names it later
                continue
    if not sizes:
        return None
    height, width = np.median(np.array(sizes), axis=0)
    return int(height), int(width)


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
