"""The data an analysis or a sweep takes: an ``ImageData`` as it is, or anything ``load`` accepts."""

from __future__ import annotations

from typing import Any

from tlkeras.data import ImageData, image_size_for, load


def as_image_data(
    data: Any, image_size: Any, weights: Any, backbone: str, **load_kwargs: Any
) -> ImageData:
    """``data`` itself when it is an ``ImageData`` (then ``image_size`` must be ``None``: its
    images already have theirs); else ``tlkeras.data.load(data, **load_kwargs)`` at
    ``image_size_for(image_size, weights, backbone, data)``."""
    if isinstance(data, ImageData):
        if image_size is not None:
            raise ValueError(
                "image_size: expected None with an ImageData (its images are already "
                f"{data.image_size}), received {image_size!r}"
            )
        return data
    size = image_size_for(image_size, weights, backbone, data)
    return load(data, image_size=size, **load_kwargs)
