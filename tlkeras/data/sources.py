"""Data in: image folders, TFDS datasets, NumPy arrays and the embedded digits set as ``tf.data``.

``load`` turns any supported source into an :class:`ImageData` with a training, a validation (early
stopping / checkpoints) and a held-out test split. Every element is ``(images, labels)`` with images
float32 ``[B, H, W, 3]`` raw pixels in 0–255 resized to ``image_size`` (models built by
``tlkeras.build_model`` preprocess inside) and labels int32 ``[B]`` (float32 multi-hot ``[B, C]`` for
multi-label arrays).

Image folders are scanned *before* training: every file is opened in a thread pool, its header is
checked against a byte cap and a pixel cap (decompression bombs), and it is decoded once with the very
op the input pipeline uses. Files that cannot be used are skipped and listed with the reason, so an
epoch never crashes on a bad file; ``max_bad_fraction`` turns a mostly-broken folder into an error.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE

# Formats ``tf.io.decode_image`` decodes, by Pillow's name for them (MPO: multi-picture JPEG that
# many cameras write; TF reads its first picture as a JPEG).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})
# OS / tool clutter skipped silently (but counted), as are names starting with ".".
IGNORED_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx"})
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
SPLITS = ("train", "validation", "test")
DIGITS = "digits"
# Scan progress is worth a bar only for folders this large.
PROGRESS_MIN_FILES = 1000
# Below this many bytes per declared pixel an over-cap image is a bomb rather than a big photo.
_BOMB_BYTES_PER_PIXEL = 0.01


@dataclass(frozen=True)
class Skipped:
    """A file that was not used (or, in ``ImageData.notes``, used after a conversion) and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class DataConfig:
    """How ``load`` splits, decodes, caps and batches a source. Validated on creation.

    Args:
        image_size: (height, width) every image is resized to (an int means square).
        batch_size: examples per batch.
        validation_split: fraction of the labelled pool held out (stratified) for early stopping and
            checkpoint selection; ignored when validation data is given. 0 means no validation set.
        test_split: fraction of the labelled pool held out for the final score, never trained or
            early-stopped on; ignored when test data is given (a ``test/`` folder). 0 means no test.
        seed: seeds the split and the shuffle; the same seed gives the same split and order.
        max_bad_fraction: fail when more than this fraction of the scanned files are unusable.
        cache: keep the decoded, resized images (as uint8) in memory after the first epoch.
        shuffle_buffer: shuffle buffer size for the training split.
        max_pixels: images declaring more pixels are skipped (decompression bombs, huge scans).
        max_file_bytes: files larger than this are skipped without being read.
    """

    image_size: tuple[int, int] = (224, 224)
    batch_size: int = 32
    validation_split: float = 0.2
    test_split: float = 0.2
    seed: int = 0
    max_bad_fraction: float = 0.1
    cache: bool = True
    shuffle_buffer: int = 1024
    max_pixels: int = 40_000_000
    max_file_bytes: int = 64 * 2**20

    def __post_init__(self):
        size = self.image_size
        if _is_int(size):
            size = (size, size)
        if (
            not isinstance(size, Sequence)
            or len(size) != 2
            or not all(_is_int(s) and s >= 1 for s in size)
        ):
            raise ValueError(
                f"image_size: expected (height, width) positive ints, received {self.image_size!r}"
            )
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        for name, minimum in (
            ("batch_size", 1),
            ("shuffle_buffer", 1),
            ("max_pixels", 1),
            ("max_file_bytes", 1),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name}: expected an int >= {minimum}, received {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed: expected an int, received {self.seed!r}")
        for name in ("validation_split", "test_split"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: expected a fraction in [0, 1), received {value!r}")
        if self.validation_split + self.test_split >= 1.0:
            raise ValueError(
                "validation_split + test_split: expected a sum below 1 (something must be left to "
                f"train on), received {self.validation_split} + {self.test_split}"
            )
        if not _is_number(self.max_bad_fraction) or not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(
                f"max_bad_fraction: expected a fraction in [0, 1], received {self.max_bad_fraction!r}"
            )
        if not isinstance(self.cache, bool):
            raise ValueError(f"cache: expected True or False, received {self.cache!r}")


@dataclass
class ImageData:
    """The result of ``load``: batched ``tf.data`` splits plus everything worth reporting about them.

    ``counts`` maps split -> class -> examples (every class listed, zeros included). ``skipped`` lists
    unusable files with the reason; ``notes`` lists files that were used after a conversion worth
    knowing about (format not matching the extension, animated GIF → first frame, alpha dropped,
    CMYK/16-bit/grayscale → 8-bit RGB); ``ignored`` counts hidden and system files; ``warnings`` holds
    dataset-level problems (e.g. an empty class folder that was left out).

    ``items`` maps split -> an identifier of each example, in the split's unshuffled order (the order
    of ``ordered(split)``): the file path relative to the source folder (as ``skipped`` shows paths),
    ``"index 17"`` for arrays and digits (the row of the arrays given; of scikit-learn's digits), the
    TFDS id (``"mnist-train.tfrecord-00000-of-00001__17"``) for TFDS.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset | None
    class_names: list[str]
    counts: dict[str, dict[str, int]]
    skipped: list[Skipped]
    source: str
    multilabel: bool = False
    notes: list[Skipped] = field(default_factory=list)
    ignored: int = 0
    warnings: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (224, 224)
    items: dict[str, list[str]] = field(default_factory=dict)
    # How to load the same data again (``load(**origin)``): text sources only, else None.
    origin: dict[str, Any] | None = None
    # The training split before its shuffle (batched, sharing the split's cache); see ordered().
    _train_ordered: tf.data.Dataset | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ordered(self, split: str) -> tf.data.Dataset | None:
        """``split`` batched without shuffling: element ``i`` is ``items[split][i]``. Same decoding,
        resizing and cache as the split (the training split's own dataset stays shuffled); ``None``
        for a split the data does not have. A folder file changed since the scan so that it no
        longer decodes is dropped with a warning, which shifts the order: compare the count."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, received {split!r}")
        if split != "train":
            return getattr(self, split)  # evaluation splits are never shuffled
        if self._train_ordered is None:
            raise ValueError(
                "ordered('train'): expected an ImageData from tlkeras.data.load, received one "
                "built without the unshuffled training split"
            )
        return self._train_ordered

    def class_weight(self) -> dict[int, float]:
        """Balanced class weights (``sklearn.utils.class_weight.compute_class_weight``) from train
        counts, for ``model.fit(class_weight=...)``. Classes absent from train get weight 1."""
        from sklearn.utils.class_weight import compute_class_weight

        if self.multilabel:
            raise ValueError(
                "class_weight: expected single-label data, received multi-label data (Keras "
                "class_weight needs one class per example)"
            )
        counts = np.array([self.counts["train"][c] for c in self.class_names])
        present = np.flatnonzero(counts)
        y = np.repeat(np.arange(len(counts)), counts)
        weights = compute_class_weight("balanced", classes=present, y=y)
        out = dict.fromkeys(range(len(counts)), 1.0)
        out.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
        return out

    def summary(self) -> str:
        """One screen: source, split sizes, per-class counts, skipped files with reasons, notes."""
        h, w = self.image_size
        lines = [f"data: {self.source}  ({h}x{w}, {len(self.class_names)} classes)"]
        totals = {s: sum(self.counts.get(s, {}).values()) for s in SPLITS}
        lines.append("splits: " + ", ".join(f"{s} {totals[s]}" for s in SPLITS if s in self.counts))
        if self.test is None:
            lines.append(
                "  (no test split: the final score would be on data used for early stopping)"
            )
        width = max([len(c) for c in self.class_names] + [5])
        header = (
            "  " + "class".ljust(width) + "".join(f"{s:>12}" for s in SPLITS if s in self.counts)
        )
        lines.append(header)
        for c in self.class_names:
            lines.append(
                "  "
                + c.ljust(width)
                + "".join(f"{self.counts[s][c]:>12}" for s in SPLITS if s in self.counts)
            )
        for message in self.warnings:
            lines.append(f"warning: {message}")
        if self.ignored:
            lines.append(f"ignored {self.ignored} hidden/system files (.DS_Store, Thumbs.db, .*)")
        lines += _grouped("skipped", self.skipped, limit=20)
        lines += _grouped("converted", self.notes, limit=5)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the data: class names, counts, skipped files and notes, source."""
        return {
            "source": self.source,
            "class_names": list(self.class_names),
            "multilabel": self.multilabel,
            "image_size": list(self.image_size),
            "counts": {s: dict(c) for s, c in self.counts.items()},
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "notes": [dataclasses.asdict(s) for s in self.notes],
            "ignored": self.ignored,
            "warnings": list(self.warnings),
            "origin": self.origin,
        }


def _grouped(title: str, items: list[Skipped], limit: int) -> list[str]:
    """Items grouped by the reason's kind (text before ':'), first ``limit`` paths per kind."""
    if not items:
        return []
    lines = [f"{title} {len(items)} files:"]
    kinds: dict[str, list[Skipped]] = {}
    for item in items:
        kinds.setdefault(item.reason.split(":")[0], []).append(item)
    for group in kinds.values():
        for item in group[:limit]:
            lines.append(f"  {item.path}: {item.reason}")
        if len(group) > limit:
            lines.append(
                f"  … and {len(group) - limit} more like {group[0].reason.split(':')[0]!r}"
            )
    return lines


# --------------------------------------------------------------------------------------------------
# Decoding, shared with serving so that training and inference see identical pixels.


def resize_image(image: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Resize ``[H, W, C]`` (or ``[B, H, W, C]``) pixels to ``image_size``; returns uint8.

    Bilinear with antialiasing (so downscaled photos do not alias), rounded to uint8: the cache then
    holds a quarter of the float32 bytes, and every path (folder, arrays, TFDS, serving) agrees.
    """
    image = tf.image.resize(tf.cast(image, tf.float32), image_size, "bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_image(contents: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Encoded bytes (JPEG/PNG/GIF/BMP/WebP, sniffed from the content, not the name) → uint8
    ``[H, W, 3]`` at ``image_size``. Grayscale/RGBA/CMYK/16-bit become 8-bit RGB; an animated GIF
    gives its first frame. Graph-safe (use it in ``tf.data`` maps and serving signatures)."""
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return resize_image(image, image_size)


# --------------------------------------------------------------------------------------------------
# File scan.


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _sniff(data: bytes) -> str:
    """Why bytes Pillow could not identify are not an image, for the skip reason."""
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "not an image (text/html)"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "unsupported format SVG/XML"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftyphevc"):
        return f"unsupported format {data[8:12].decode().upper()}"
    if head.startswith(b"%pdf"):
        return "not an image (application/pdf)"
    try:
        data[:4096].decode("utf-8")
        return "not an image (text/plain)"
    except UnicodeDecodeError:
        return f"not an image (unrecognised bytes {data[:8].hex()})"


def declared_dimensions(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` as an image header declares it (``None`` if no supported format reads
    it), without decoding and bypassing Pillow's bomb check (which hides the size)."""
    from PIL import Image

    for fmt in SUPPORTED_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and accept(data[:16]) is not True):
            continue
        try:
            width, height = factory(io.BytesIO(data)).size
            return int(width), int(height)
        except Exception:  # a header Pillow cannot read: try the next format
            continue
    return None


def _declared_size(data: bytes, fallback: str) -> str:
    """``WxH`` as the header declares it, or ``fallback``."""
    size = declared_dimensions(data)
    return f"{size[0]}x{size[1]}" if size else fallback


def _tf_error_text(error: Exception) -> str:
    text = str(getattr(error, "message", error))
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\]", "", text).strip()


def check_image_file(path: str | os.PathLike, config: DataConfig | None = None):
    """Check one file the way ``load`` does. Returns ``(reason, note)``: ``reason`` is None when the
    file is usable, ``note`` describes a conversion applied to a usable file (or None)."""
    from PIL import Image, UnidentifiedImageError

    config = config or DataConfig()
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "zero-byte file", None
        if size > config.max_file_bytes:
            return (
                f"file too large: {size / 2**20:.1f} MiB, over the "
                f"{config.max_file_bytes / 2**20:.0f} MiB cap",
                None,
            )
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}", None
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height), mode = image.format, image.size, image.mode
            animated = bool(getattr(image, "is_animated", False))
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        declared = _declared_size(data, f"{pixels.group(1) if pixels else '?'} pixels")
        return f"decompression bomb: declared {declared} in {size} bytes", None
    except UnidentifiedImageError:
        return _sniff(data), None
    except (OSError, SyntaxError, ValueError) as e:  # a known format whose header is cut or broken
        fmt = next((f for magic, f in _MAGIC if data.startswith(magic)), None)
        return (f"truncated/corrupt {fmt}: {e}" if fmt else _sniff(data)), None
    if fmt not in SUPPORTED_FORMATS:
        return f"unsupported format {fmt} (expected one of JPEG, PNG, GIF, BMP, WebP)", None
    if width * height > config.max_pixels:
        if size < width * height * _BOMB_BYTES_PER_PIXEL:
            return f"decompression bomb: declared {width}x{height} in {size} bytes", None
        return (
            f"image too large: {width}x{height} = {width * height / 1e6:.0f} MP, over the "
            f"{config.max_pixels / 1e6:.0f} MP cap",
            None,
        )
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return f"truncated/corrupt {fmt}: {_tf_error_text(e)}", None
    return None, _conversion_note(Path(path).suffix.lower(), fmt, mode, animated)


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WEBP"),
)
_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".jpg", ".jpeg", ".mpo"),
    "PNG": (".png",),
    "GIF": (".gif",),
    "BMP": (".bmp", ".dib"),
    "WEBP": (".webp",),
}
_MODE_NOTES = {
    "L": "grayscale → RGB",
    "LA": "grayscale+alpha → RGB (alpha dropped)",
    "RGBA": "RGBA → RGB (alpha dropped)",
    "PA": "palette+alpha → RGB (alpha dropped)",
    "P": "palette (indexed colours) → RGB",
    "CMYK": "CMYK → RGB",
    "I;16": "16-bit → 8-bit RGB",
    "I;16B": "16-bit → 8-bit RGB",
    "I": "32-bit → 8-bit RGB",
    "1": "1-bit → RGB",
}


def _conversion_note(suffix: str, fmt: str, mode: str, animated: bool) -> str | None:
    parts = []
    if suffix not in _EXTENSIONS[fmt]:
        parts.append(f"{fmt} named {suffix or '(no extension)'}")
    if animated:
        parts.append("animated: first frame used")
    if mode in _MODE_NOTES:
        parts.append(_MODE_NOTES[mode])
    return f"decoded as {fmt}: " + ", ".join(parts) if parts else None


def _scan(paths: list[str], config: DataConfig, display_root: Path):
    """Check ``paths`` in parallel. Returns (ok mask, skipped, notes), in ``paths`` order."""
    from PIL import Image

    def rel(p: str) -> str:
        return os.path.relpath(p, display_root)

    progress = None
    if len(paths) > PROGRESS_MIN_FILES:
        import keras

        print(f"Checking {len(paths)} image files…", flush=True)
        progress = keras.utils.Progbar(len(paths), unit_name="file")
    ok = np.zeros(len(paths), bool)
    skipped, notes = [], []
    workers = min(32, 4 * (os.cpu_count() or 1))
    # Pillow's own bomb warnings are redundant with max_pixels; silenced for the scan (main thread
    # only touches the filter list, so the pool threads just read it).
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        results = pool.map(lambda p: check_image_file(p, config), paths)
        for i, (path, (reason, note)) in enumerate(zip(paths, results, strict=True)):
            if reason is None:
                ok[i] = True
                if note:
                    notes.append(Skipped(rel(path), note))
            else:
                skipped.append(Skipped(rel(path), reason))
            if progress is not None and ((i + 1) % 100 == 0 or i + 1 == len(paths)):
                progress.update(i + 1)
    return ok, skipped, notes


# --------------------------------------------------------------------------------------------------
# Sources → pools of labelled examples.


@dataclass
class _Pool:
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


def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError as e:
        raise ValueError(
            f"expected a readable folder, received {str(path)!r} ({e.strerror})"
        ) from e
    except OSError as e:
        raise ValueError(f"expected a readable folder, received {str(path)!r} ({e})") from e


def _class_folders(root: Path) -> tuple[list[os.DirEntry], int, int]:
    """(class folders, ignored entries, loose files at the top level)."""
    folders, ignored, loose = [], 0, 0
    for entry in _list_dir(root):
        if _is_ignored(entry.name):
            ignored += 1
        elif entry.is_dir():
            folders.append(entry)
        else:
            loose += 1
    return folders, ignored, loose


def _walk_files(folder: str) -> tuple[list[str], int]:
    """Regular files under ``folder`` (recursively, sorted), and how many entries were ignored
    (a hidden folder counts once)."""
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise):
        ignored += sum(_is_ignored(d) for d in dirnames)
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        for name in sorted(filenames):
            if _is_ignored(name):
                ignored += 1
            else:
                files.append(os.path.join(dirpath, name))
    return files, ignored


def _raise(error: OSError):
    raise ValueError(f"expected a readable folder, received {error.filename!r} ({error.strerror})")


def _folder_pool(
    root: Path,
    config: DataConfig,
    class_names: list[str] | None = None,
    display: Path | None = None,
) -> _Pool:
    """One subfolder per class under ``root``. With ``class_names`` (a val/test folder), folders must
    be a subset of them and labels follow their order."""
    display = display or root
    folders, ignored, loose = _class_folders(root)
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
        files, n_ignored = _walk_files(folder.path)
        ignored += n_ignored
        files_by_class[folder.name] = files
    all_files = [f for files in files_by_class.values() for f in files]
    if not all_files:
        raise ValueError(
            f"expected image files in the class folders of {str(root)!r}, received none "
            f"(folders: {sorted(files_by_class)})"
        )
    ok, skipped, notes = _scan(all_files, config, display)
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

    return _Pool(
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


def _folder_layout(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "validation": ..., "test": ...}`` when ``root`` holds split folders."""
    folders, _, _ = _class_folders(root)
    names = {f.name.lower(): Path(f.path) for f in folders}
    if "train" not in names or not set(names) <= set(SPLIT_FOLDERS):
        return None
    if "val" in names and "validation" in names:
        raise ValueError(
            f"split folders of {str(root)!r}: expected one of 'val' or 'validation', received both"
        )
    return {SPLIT_FOLDERS[k]: v for k, v in names.items()}


def _array_pool(
    arrays: tuple, config: DataConfig, class_names: Sequence[str] | None, what: str = "arrays"
) -> _Pool:
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
    return _Pool(class_names, y, make, source=src, names=[f"index {i}" for i in range(len(y))])


def _digits_pool(spec: str, config: DataConfig) -> _Pool:
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


def _tfds_pool(spec: str, config: DataConfig, class_names: list[str] | None = None) -> _Pool:
    """``tfds:NAME[/CONFIG][:SPLIT]``; images stay encoded until ``decode_image`` (same as folders)."""
    match = _TFDS.fullmatch(spec.strip())
    if not match:
        raise ValueError(f"expected 'tfds:NAME[/CONFIG][:SPLIT]', received {spec!r}")
    name, split = match.group("name"), match.group("split") or "train"
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
    names = list(features[label_key].names)
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

    return _Pool(class_names or names, labels, make, source=f"tfds:{name}:{split}", names=ids)


def _pool(source: Any, config: DataConfig, class_names=None, given_names=None) -> _Pool:
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
    return _folder_pool(path, config, class_names)


# --------------------------------------------------------------------------------------------------
# Splitting and the input pipeline.


def _split(pool: _Pool, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
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


def _pipeline(
    ds: tf.data.Dataset, config: DataConfig, training: bool, size: int
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """decoded uint8 elements → cache → (shuffle) → batch → float32 → prefetch; also the same
    without the shuffle (for training: ``ImageData.ordered``), reading the same cache."""
    if config.cache:
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


def _counts(pool: _Pool, idx: np.ndarray) -> dict[str, int]:
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
    if config is not None and not isinstance(config, DataConfig):
        raise TypeError(f"config: expected a DataConfig, received {type(config).__name__}")
    config = dataclasses.replace(config or DataConfig(), **config_overrides)

    pool, given = _pools(source, validation, config, class_names)
    all_pools = [pool, *given.values()]
    skipped = _check_pools(pool, all_pools, config)
    fractions = {
        "test": 0.0 if "test" in given else config.test_split,
        "validation": 0.0 if "validation" in given else config.validation_split,
    }
    indices = _split(pool, fractions, config.seed)
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
        datasets[split], ordered = _pipeline(p.make(idx), config, split == "train", len(idx))
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
) -> tuple[_Pool, dict[str, _Pool]]:
    """The pool to split and the splits given whole (``train/val/test`` folders, ``validation=``)."""
    given: dict[str, _Pool] = {}
    layout = None
    if isinstance(source, str | os.PathLike) and not (
        str(source).startswith("tfds:") or is_digits(str(source))
    ):
        path = Path(source).expanduser()
        if path.is_dir():
            layout = _folder_layout(path)
    if layout is not None:
        pool = _folder_pool(layout["train"], config, display=Path(source).expanduser())
        for split in ("validation", "test"):
            if split in layout:
                given[split] = _folder_pool(
                    layout[split], config, pool.class_names, display=Path(source).expanduser()
                )
        pool.source = str(Path(source).expanduser())
    else:
        pool = _pool(source, config, given_names=class_names)
    if validation is not None:
        if "validation" in given:
            raise ValueError(
                f"validation: expected validation data once, received both validation= and a "
                f"validation folder in {str(source)!r}"
            )
        given["validation"] = _pool(validation, config, class_names=pool.class_names)

    return pool, given


def _check_pools(pool: _Pool, all_pools: list[_Pool], config: DataConfig) -> list:
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


RESOLUTION_SAMPLE = 256  # files whose headers source_resolution reads (seeded sample)


def source_resolution(
    source: Any, *, sample: int = RESOLUTION_SAMPLE, seed: int = 0
) -> tuple[int, int] | None:
    """The median ``(height, width)`` of ``source``'s images before any resizing, or ``None`` when
    it cannot be told cheaply (a TFDS set, an unreadable folder).

    A folder is judged from the headers of a seeded sample of ``sample`` files (no decoding:
    milliseconds); arrays from their shape; the embedded digits are 8x8. ``image_size="auto"``
    (``tlkeras.models.weights.image_size_for``) uses it to pick an input size.
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
    layout = _folder_layout(path) or {"train": path}
    try:
        files = _walk_files(str(layout["train"]))[0]
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


def is_digits(source: Any) -> bool:
    """Whether ``source`` names the embedded digits (``"digits"`` or ``"digits:A-B"``)."""
    return isinstance(source, str) and (source == DIGITS or source.startswith(DIGITS + ":"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)
