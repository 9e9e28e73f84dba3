"""data: data configs and ImageData, decoding, folder/TFDS/array sources, augmentation

Sits on ``models`` (augmentation layers need the model spec); the layers above import data
through this package's names.

- ``config``: ``DataConfig`` and ``ImageData`` (the splits as ``tf.data``, counts, skipped files).
- ``files``: decoding, the checks of one image file, the threaded scan of a folder.
- ``pools``: a source (folder, arrays, digits, TFDS) as every labelled example in it.
- ``sources``: ``load``: the split, the pipeline.
- ``sizing``: ``image_size="auto"`` from the data's resolution.
- ``decoding``: bytes decoded as the serving signature decodes them.
- ``augment``: augmentation presets, batch mixing (MixUp/CutMix).
- ``arrays``: ``dataset_arrays``, a dataset as NumPy arrays.
"""

from tlkeras.data.arrays import dataset_arrays
from tlkeras.data.config import (
    AUTOTUNE,
    DIGITS,
    SPLIT_FOLDERS,
    SPLITS,
    DataConfig,
    ImageData,
    Skipped,
    is_digits,
)
from tlkeras.data.files import (
    IGNORED_NAMES,
    PROGRESS_MIN_FILES,
    SUPPORTED_FORMATS,
    check_image_file,
    declared_dimensions,
    decode_image,
    resize_image,
)
from tlkeras.data.sizing import (
    RESOLUTION_SAMPLE,
    choose_image_size,
    image_size_for,
    source_resolution,
)
from tlkeras.data.sources import load

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
    "choose_image_size",
    "declared_dimensions",
    "decode_image",
    "image_size_for",
    "is_digits",
    "load",
    "resize_image",
    "source_resolution",
]
