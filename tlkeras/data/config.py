"""Data configs and results: :class:`DataConfig` (how ``load`` splits, decodes and batches),
:class:`ImageData` (what it returns), :class:`Skipped`, the split names and the embedded digits' name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from tlkeras import checks

AUTOTUNE = tf.data.AUTOTUNE

SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
SPLITS = ("train", "validation", "test")
DIGITS = "digits"


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
        cache: keep the decoded, resized images (uint8) after their first pass: in memory up to
            ``memory_cache_mib``, else in a file.
        memory_cache_mib: MiB of decoded images kept in memory, over all splits (the smallest
            splits first). A split past it is decoded once, at load, into a file cache in a
            temporary directory (removed at exit), so memory stays flat as the folder grows
            (50,000 images at 96x96 are 1.3 GiB decoded). 0: every split in a file.
        shuffle_buffer: shuffle buffer size for the training split.
        max_pixels: images declaring more pixels are skipped (decompression bombs, huge scans).
        max_file_bytes: files larger than this are skipped without being read.
    """

    image_size: tuple[int, int] = (224, 224)
    # metadata: the options as the scripts show them (tlkeras.cli.define_config_flags).
    batch_size: int = field(default=32, metadata={"help": "Batch size."})
    validation_split: float = field(
        default=0.2, metadata={"help": "Fraction of --data held out for validation."}
    )
    test_split: float = field(
        default=0.2, metadata={"help": "Fraction of --data held out for the final test score."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds the split and the shuffle."})
    max_bad_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Fail when more than this fraction of a data folder's files are unusable "
            "(fewer are skipped and listed)."
        },
    )
    cache: bool = True
    memory_cache_mib: int = 512
    shuffle_buffer: int = 1024
    max_pixels: int = 40_000_000
    max_file_bytes: int = 64 * 2**20

    def __post_init__(self):
        size = self.image_size
        if checks.is_int(size):
            size = (size, size)
        if (
            not isinstance(size, Sequence)
            or len(size) != 2
            or not all(checks.is_int(s) and s >= 1 for s in size)
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
            ("memory_cache_mib", 0),
        ):
            checks.integer(name, getattr(self, name), minimum)
        checks.integer("seed", self.seed)
        for name in ("validation_split", "test_split"):
            checks.fraction(name, getattr(self, name), kind="a fraction")
        if self.validation_split + self.test_split >= 1.0:
            raise ValueError(
                "validation_split + test_split: expected a sum below 1 (something must be left to "
                f"train on), received {self.validation_split} + {self.test_split}"
            )
        checks.fraction(
            "max_bad_fraction", self.max_bad_fraction, upper_inclusive=True, kind="a fraction"
        )
        checks.boolean("cache", self.cache)


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
        checks.choice("split", split, list(SPLITS), as_repr=True)
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


def is_digits(source: Any) -> bool:
    """Whether ``source`` names the embedded digits (``"digits"`` or ``"digits:A-B"``)."""
    return isinstance(source, str) and (source == DIGITS or source.startswith(DIGITS + ":"))
