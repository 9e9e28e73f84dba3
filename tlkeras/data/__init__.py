"""data: data configs and ``ImageData``, decoding, folder/TFDS/array/digits sources, augmentation.

Sits on ``models`` (augmentation layers need the model spec); the layers above import data through
this package's names.
"""

from tlkeras.data.arrays import dataset_arrays
from tlkeras.data.sources import (
    AUTOTUNE,
    DIGITS,
    IGNORED_NAMES,
    PROGRESS_MIN_FILES,
    RESOLUTION_SAMPLE,
    SPLIT_FOLDERS,
    SPLITS,
    SUPPORTED_FORMATS,
    DataConfig,
    ImageData,
    Skipped,
    check_image_file,
    declared_dimensions,
    decode_image,
    is_digits,
    load,
    resize_image,
    source_resolution,
)

__all__ = [
    "dataset_arrays",
    "AUTOTUNE",
    "DIGITS",
    "DataConfig",
    "IGNORED_NAMES",
    "ImageData",
    "PROGRESS_MIN_FILES",
    "RESOLUTION_SAMPLE",
    "SPLITS",
    "SPLIT_FOLDERS",
    "SUPPORTED_FORMATS",
    "Skipped",
    "check_image_file",
    "declared_dimensions",
    "decode_image",
    "is_digits",
    "load",
    "resize_image",
    "source_resolution",
]
