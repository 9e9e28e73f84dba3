"""Sources -> pools: every labelled example of one source (a folder of class folders, NumPy
arrays, the embedded digits, a TFDS dataset) before ``load`` splits it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tlkeras.data.config import AUTOTUNE, DataConfig, Skipped, is_digits
from tlkeras.data.files import class_folders, decode_image, resize_image, scan_files, walk_files

logger = logging.getLogger(__name__)


@dataclass
class Pool:
    """All labelled examples of one source, before splitting."""

    class_names: list[str]
    labels: np.ndarray  # int [N], or float32 multi-hot [N, C]
    make: Callable[[np.ndarray], tf.data.Dataset]  # indices -> (uint8 [H, W, 3], label) elements
    source: str
    names: list[str] = field(default_factory=list)  # one identifier per example (ImageData.items)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[Skipped] = field(default_factory=list)
    ignored: int = 0
    scanned: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.labels)


def folder_pool(
    root: Path,
    config: DataConfig,
    class_names: list[str] | None = None,
    display: Path | None = None,
) -> Pool:
    """One subfolder per class under ``root``. With ``class_names`` (a val/test folder), folders must
    be a subset of them and labels follow their order."""
    display = display or root
    folders, ignored, loose = class_folders(root)
    warnings_: list[str] = []
    if loose:
        warnings_.append(
            f"{loose} files directly in {str(root)!r} are not in a class folder: ignored"
        )
    if not folders:
        raise ValueError(
            f"expected one subfolder per class in {str(root)!r}, received "
            + (f"{loose} files and no subfolders" if loose else "an empty folder")
        )
    if class_names is not None:
        unknown = sorted({f.name for f in folders} - set(class_names))
        if unknown:
            raise ValueError(
                f"class folders of {str(root)!r}: expected a subset of the training classes "
                f"{class_names}, received unknown {unknown}"
            )
    files_by_class: dict[str, list[str]] = {}
    for folder in folders:
        files, n_ignored = walk_files(folder.path)
        ignored += n_ignored
        files_by_class[folder.name] = files
    all_files = [f for files in files_by_class.values() for f in files]
    if not all_files:
        raise ValueError(
            f"expected image files in the class folders of {str(root)!r}, received none "
            f"(folders: {sorted(files_by_class)})"
        )
    ok, skipped, notes = scan_files(all_files, config, display)
    usable: dict[str, list[str]] = {}
    start = 0
    for name, files in files_by_class.items():
        mask = ok[start : start + len(files)]
        start += len(files)
        usable[name] = [f for f, good in zip(files, mask, strict=True) if good]
    if class_names is None:
        # An empty class cannot be learned; leaving it out (loudly) beats failing a whole run.
        for name, files in usable.items():
            if not files:
                n = len(files_by_class[name])
                warnings_.append(
                    f"class folder {name!r} has no usable images"
                    + (f" ({n} skipped)" if n else " (empty)")
                    + ": left out of the classes"
                )
                logger.warning("tlkeras.data.sources: %s", warnings_[-1])
        class_names = [name for name, files in usable.items() if files]
    index = {name: i for i, name in enumerate(class_names)}
    paths = [f for name in usable for f in usable[name] if name in index]
    labels = np.array(
        [index[name] for name in usable for _ in usable[name] if name in index], np.int64
    )

    def make(idx: np.ndarray) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(
            (np.array(paths, dtype=object)[idx].astype(str), labels[idx].astype(np.int32))
        )
        ds = ds.map(
            lambda p, y: (decode_image(tf.io.read_file(p), config.image_size), y),
            num_parallel_calls=AUTOTUNE,
        )
        # Every file was decoded during the scan; this only guards against files changed since.
        return ds.ignore_errors(log_warning=True)

    return Pool(
        class_names=list(class_names),
        labels=labels,
        make=make,
        source=str(root),
        names=[os.path.relpath(p, display) for p in paths],
        skipped=skipped,
        notes=notes,
        ignored=ignored,
        scanned=len(all_files),
        warnings=warnings_,
    )


def _array_pool(
    arrays: tuple, config: DataConfig, class_names: Sequence[str] | None, what: str = "arrays"
) -> Pool:
    if not isinstance(arrays, tuple | list) or len(arrays) not in (2, 3):
        raise TypeError(f"{what}: expected a tuple (x, y) of NumPy arrays, received {type(arrays)}")
    if len(arrays) == 3:
        if class_names is not None:
            raise ValueError(f"{what}: class names given twice (in the tuple and as class_names=)")
        class_names = arrays[2]
    x, y = np.asarray(arrays[0]), np.asarray(arrays[1])
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or min(x.shape[1:3], default=0) < 1:
        raise ValueError(
            f"{what} x: expected shape [N, H, W, C] with C in {{1, 3}}, received {x.shape}"
        )
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise TypeError(f"{what} x: expected uint8 or float pixels 0–255, received dtype {x.dtype}")
    if x.size:
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
            raise ValueError(f"{what} x: expected pixel values in [0, 255], received [{lo}, {hi}]")
        if np.issubdtype(x.dtype, np.floating) and 0 < hi <= 1.0:
            raise ValueError(
                f"{what} x: expected raw pixels 0–255, received floats in [{lo}, {hi}] "
                "(multiply by 255; models preprocess for their backbone themselves)"
            )
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if len(y) != len(x):
        raise ValueError(
            f"{what}: expected as many labels as images, received {len(y)} and {len(x)}"
        )
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer) and not (
            np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)
        ):
            raise TypeError(f"{what} y: expected integer class ids, received dtype {y.dtype}")
        y = y.astype(np.int64)
        if y.size and y.min() < 0:
            raise ValueError(f"{what} y: expected class ids >= 0, received {int(y.min())}")
        num_classes = int(y.max()) + 1 if y.size else 0
    elif y.ndim == 2:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(
                f"{what} y: expected a multi-hot [N, C] array of 0/1, received other values"
            )
        y = y.astype(np.float32)
        num_classes = y.shape[1]
    else:
        raise ValueError(
            f"{what} y: expected shape [N] (class ids) or [N, C] (multi-hot), received {y.shape}"
        )
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    class_names = [str(c) for c in class_names]
    if len(class_names) < num_classes or (y.ndim == 2 and len(class_names) != num_classes):
        raise ValueError(
            f"{what} class_names: expected {num_classes} names for the labels, received "
            f"{len(class_names)}"
        )
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"{what} class_names: expected unique names, received {class_names}")

    def make(idx: np.ndarray) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(
            (x[idx], y[idx].astype(np.int32 if y.ndim == 1 else np.float32))
        )

        def prepare(image, label):
            image = tf.tile(image, [1, 1, 3]) if x.shape[-1] == 1 else image
            return resize_image(image, config.image_size), label

        return ds.map(prepare, num_parallel_calls=AUTOTUNE)

    src = f"arrays x{list(x.shape)}"
    return Pool(class_names, y, make, source=src, names=[f"index {i}" for i in range(len(y))])


def _digits_pool(spec: str, config: DataConfig) -> Pool:
    """scikit-learn's bundled 8x8 digits (1,797 real scans, offline), optionally a digit range."""
    from sklearn.datasets import load_digits

    match = re.fullmatch(r"digits(?::(\d)-(\d))?", spec.strip())
    if not match or (match.group(1) and int(match.group(1)) >= int(match.group(2))):
        raise ValueError(
            f"expected 'digits' or 'digits:A-B' with 0 <= A < B <= 9, received {spec!r}"
        )
    first, last = (int(match.group(1)), int(match.group(2))) if match.group(1) else (0, 9)
    digits = load_digits()
    keep = (digits.target >= first) & (digits.target <= last)
    x = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target[keep] - first
    pool = _array_pool((x, y), config, [str(d) for d in range(first, last + 1)], what=spec)
    pool.source = f"{spec} (scikit-learn digits, {len(y)} 8x8 scans)"
    pool.names = [f"index {i}" for i in np.flatnonzero(keep)]  # rows of load_digits()
    return pool


_TFDS = re.compile(
    r"tfds:(?P<name>[\w-]+(?:/[\w.-]+)?(?::\d+\.[\d*]+\.[\d*]+)?)(?::(?P<split>.+))?"
)


def _tfds_builder(name: str):
    """The TFDS builder of ``name`` and its (image, label) supervised keys; ``ValueError`` when it
    is not registered or not an image classification dataset."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name)
    except tfds.core.registered.DatasetNotFoundError:
        import difflib

        close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=3)
        raise ValueError(
            f"expected a registered TFDS dataset name, received {name!r}"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
        ) from None
    except Exception as e:  # bad config / version: TFDS messages are long, keep the first line
        raise ValueError(f"TFDS dataset {name!r}: {str(e).splitlines()[0]}") from None
    keys = builder.info.supervised_keys
    features = builder.info.features
    if (
        not keys
        or len(keys) != 2
        or not isinstance(keys[0], str)
        or not isinstance(features[keys[0]], tfds.features.Image)
        or not isinstance(features[keys[1]], tfds.features.ClassLabel)
    ):
        raise ValueError(
            f"TFDS dataset {name!r}: expected an image classification dataset with supervised keys "
            f"(Image, ClassLabel), received {keys}"
        )
    image_key, label_key = keys
    return builder, image_key, label_key


def _tfds_pool(spec: str, config: DataConfig, class_names: list[str] | None = None) -> Pool:
    """``tfds:NAME[/CONFIG][:SPLIT]``; images stay encoded until ``decode_image`` (same as folders)."""
    match = _TFDS.fullmatch(spec.strip())
    if not match:
        raise ValueError(f"expected 'tfds:NAME[/CONFIG][:SPLIT]', received {spec!r}")
    name, split = match.group("name"), match.group("split") or "train"
    import tensorflow_datasets as tfds

    builder, image_key, label_key = _tfds_builder(name)
    names = list(builder.info.features[label_key].names)
    try:
        examples = tfds.load(
            name,
            split=split,
            decoders={image_key: tfds.decode.SkipDecoding()},
            shuffle_files=False,
            read_config=tfds.ReadConfig(add_tfds_id=True),
        )
    except Exception as e:  # unknown split, no network to download, …: one line, not a traceback
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not builder.is_prepared():
            raise ValueError(
                f"TFDS dataset {name!r}: expected it prepared in {builder.data_dir} or downloadable, "
                f"received a download/prepare failure ({reason}); run `tfds build {name}` where "
                "there is network, or set TFDS_DATA_DIR"
            ) from None
        raise ValueError(f"TFDS dataset {name!r} split {split!r}: {reason}") from None
    raw = examples.map(lambda ex: (ex[image_key], ex[label_key]))
    if "tfds_id" in examples.element_spec:  # one pass: labels and each example's TFDS id
        rows = list(examples.map(lambda ex: (ex[label_key], ex["tfds_id"])).as_numpy_iterator())
        labels = np.array([y for y, _ in rows], np.int64)
        ids = [i.decode() for _, i in rows]
    else:
        labels = np.fromiter(raw.map(lambda _, y: y).as_numpy_iterator(), np.int64)
        ids = [f"{split} index {i}" for i in range(len(labels))]
    if class_names is not None:
        if not set(names) <= set(class_names):
            raise ValueError(
                f"{spec}: expected the training classes {class_names}, received {names}"
            )
        remap = np.array([class_names.index(n) for n in names])
        labels = remap[labels]
    else:
        remap = None

    def make(idx: np.ndarray) -> tf.data.Dataset:
        ds = raw
        if len(idx) != len(labels):
            member = np.zeros(len(labels), bool)
            member[idx] = True
            member = tf.constant(member)
            ds = ds.enumerate().filter(lambda i, _: tf.gather(member, i)).map(lambda _, xy: xy)
        table = tf.constant(remap if remap is not None else np.arange(len(names)), tf.int32)
        return ds.map(
            lambda image, y: (decode_image(image, config.image_size), tf.gather(table, y)),
            num_parallel_calls=AUTOTUNE,
        )

    return Pool(class_names or names, labels, make, source=f"tfds:{name}:{split}", names=ids)


def source_pool(source: Any, config: DataConfig, class_names=None, given_names=None) -> Pool:
    """Dispatch on the source form. ``class_names``: the training classes (for val/test sources)."""
    if isinstance(source, tuple | list) and not isinstance(source, str):
        pool = _array_pool(
            tuple(source), config, given_names if class_names is None else class_names
        )
        if class_names is not None and len(pool.class_names) > len(class_names):
            raise ValueError(
                f"validation arrays: expected labels of the {len(class_names)} training classes, "
                f"received {len(pool.class_names)}"
            )
        if class_names is not None:
            pool.class_names = list(class_names)
        return pool
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(
            "source: expected a folder path, 'tfds:NAME[/CONFIG][:SPLIT]', 'digits[:A-B]' or a "
            f"tuple (x, y) of arrays, received {type(source).__name__}"
        )
    if source.startswith("tfds:"):
        return _tfds_pool(source, config, class_names)
    if is_digits(source):
        pool = _digits_pool(source, config)
        if class_names is not None and pool.class_names != list(class_names):
            raise ValueError(
                f"{source}: expected classes {class_names}, received {pool.class_names}"
            )
        return pool
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            "source: expected an existing folder, 'tfds:NAME[/CONFIG][:SPLIT]', 'digits[:A-B]' or "
            f"(x, y) arrays, received {source!r} (no such file or directory)"
        )
    if not path.is_dir():
        raise ValueError(
            f"source: expected a folder of class subfolders, received the file {source!r}"
        )
    return folder_pool(path, config, class_names)
