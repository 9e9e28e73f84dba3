"""The data audit's thresholds (``AuditConfig``) and findings (``AuditResult``: its summary and its
``audit.json``). ``tlkeras.analysis.audit_probes`` runs the checks that fill it;
``tlkeras.analysis.audit`` is the entry from images.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import checks

# Cosine similarity of L2-normalised pooled features at which two images are near-duplicates.
# Measured on the 245 ants/bees photos with MobileNet(alpha=0.25) ImageNet features at 224x224: two
# different photos reach at most 0.906 (the closest pair: two bare-sand shots; nearest neighbours'
# 99th percentile 0.888); copies of 20 photos score: the same file or a PNG re-encode >= 0.9988,
# brightness +20 % >= 0.962 (median 0.995), half-size JPEG q75 median 0.961 (min 0.916), mirrored
# median 0.963 (min 0.940), rotated 5 degrees median 0.960 (min 0.936), quarter-size q60 median
# 0.83 (lost among different photos). 0.95 keeps a 0.044 margin over different photos (other
# backbones spread differently) and finds exact and re-encoded copies and about half of the
# resized/edited ones; lower it (0.92–0.93 here) to find more, at less margin.
DEFAULT_DUPLICATE_THRESHOLD = 0.95
DEFAULT_MISLABEL_CONFIDENCE = 0.9
DEFAULT_FOLDS = 5
DEFAULT_MAX_PAIRS = 100
# Images audited at most: past it, every k-th image of each split. Bounds the audit at any folder
# size: the pair search is all-pairs (10,000 images: 0.2 s at 256-d features) and each image is
# embedded once more (10,000 at 96 px on 2 cores: about 5 s); 50,000 would cost 25x the pairs.
DEFAULT_MAX_IMAGES = 10_000
# Items printed per list by summary(); audit.json has up to max_pairs / max_mislabels.
SUMMARY_LINES = 10


@dataclass(frozen=True)
class AuditConfig:
    """Thresholds of the audit. Validated on creation.

    Attributes:
        duplicate_threshold: cosine similarity (of L2-normalised features) at or above which two
            images are near-duplicates, in (0, 1]; see ``DEFAULT_DUPLICATE_THRESHOLD``.
        mislabel_confidence: a suspected mislabel is predicted as another class with at least this
            probability by the cross-validated probe, in (0, 1].
        folds: cross-validation folds of the probe (>= 2); classes with fewer images are not judged.
        max_pairs: near-duplicate pairs listed per kind (leaks, within-split), most similar first;
            all are counted.
        max_mislabels: suspected mislabels listed, most confident first; all are counted.
        probe_c: the probe's inverse L2 strength on standardised features; ``None``: chosen by
            log loss on the first of the probe's folds over ``tlkeras.fitting.head_solver.CS``.
        seed: seeds the probe's folds.
        max_images: audit at most this many images (every k-th image of each split, k the
            smallest that fits); 0: all of them.
    """

    # metadata: the options as scripts/audit.py shows them (tlkeras.cli.define_config_flags).
    duplicate_threshold: float = field(
        default=DEFAULT_DUPLICATE_THRESHOLD,
        metadata={
            "help": "Cosine similarity of pooled features at or above which two images are "
            "near-duplicates."
        },
    )
    mislabel_confidence: float = field(
        default=DEFAULT_MISLABEL_CONFIDENCE,
        metadata={
            "help": "List an image when the cross-validated probe gives another class at least "
            "this probability."
        },
    )
    folds: int = field(
        default=DEFAULT_FOLDS, metadata={"help": "Cross-validation folds of the mislabel probe."}
    )
    max_pairs: int = field(
        default=DEFAULT_MAX_PAIRS, metadata={"help": "Near-duplicate pairs listed per kind."}
    )
    max_mislabels: int = DEFAULT_MAX_PAIRS
    probe_c: float | None = None
    seed: int = field(default=0, metadata={"help": "Seeds the folds of the mislabel probe."})
    max_images: int = field(
        default=DEFAULT_MAX_IMAGES,
        metadata={
            "help": "Audit at most this many images: past it, every k-th image of each split "
            "(the report says so); 0: all."
        },
    )

    def __post_init__(self) -> None:
        for name in ("duplicate_threshold", "mislabel_confidence"):
            checks.interval(name, getattr(self, name), 0, 1, low_open=True)
        for name, minimum in (
            ("folds", 2),
            ("max_pairs", 0),
            ("max_mislabels", 0),
            ("seed", 0),
            ("max_images", 0),
        ):
            checks.integer(name, getattr(self, name), minimum)
        if self.probe_c is not None and (
            not checks.is_number(self.probe_c)
            or not math.isfinite(self.probe_c)
            or self.probe_c <= 0
        ):
            raise ValueError(
                f"probe_c: expected a positive number or None, received {self.probe_c!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AuditResult:
    """What the audit checked and found (``summary()`` prints it, ``write_json`` saves it).

    Attributes:
        config: the thresholds used.
        class_names: the classes, in label order.
        splits: examples audited per split.
        feature_dim: the embedding's width.
        leaks: near-duplicate pairs across splits (at most ``max_pairs``, most similar first); each
            ``{"similarity", "identical", "leak", "splits", "labels_differ", "a", "b"}`` with ``a``
            and ``b`` ``{"split", "item", "label"}`` (``a`` in the earlier split).
        leak_count: all such pairs.
        leaks_by_splits: ``{"train/test": pairs, ...}``.
        leaked_items: per split, its images with a near-duplicate in another split.
        duplicates: near-duplicate pairs within a split (same form, ``leak`` False).
        duplicate_count: all such pairs.
        mislabels: suspected mislabels, most confident first: ``{"split", "item", "label",
            "predicted", "confidence", "label_probability"}``.
        mislabel_count: all suspects.
        mislabel_check: how the mislabel part ran: ``done``, ``reason`` (why skipped) or the probe's
            ``C``, ``folds``, ``judged`` images, cross-validated ``accuracy``, ``classes_not_judged``.
        source: the data source; ``data``: its record (``ImageData.to_dict()``: skipped and
            converted files); ``embedding``: the backbone, weights and image size that made the
            features (``audit_data``).
        seconds: wall time.
        sampled: ``{}`` when every image was audited, else ``{"every": k, "images": audited,
            "of": all}`` (``AuditConfig.max_images``).
    """

    config: AuditConfig
    class_names: list[str]
    splits: dict[str, int]
    feature_dim: int
    leaks: list[dict[str, Any]]
    leak_count: int
    leaks_by_splits: dict[str, int]
    leaked_items: dict[str, int]
    duplicates: list[dict[str, Any]]
    duplicate_count: int
    mislabels: list[dict[str, Any]]
    mislabel_count: int
    mislabel_check: dict[str, Any]
    source: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    embedding: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sampled: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return sum(self.splits.values())

    def summary(self) -> str:
        """One screen: what was audited, the leaks, duplicates and suspects, the time taken."""
        c = self.config
        splits = ", ".join(f"{s} {n}" for s, n in self.splits.items())
        where = f" of {self.source}" if self.source else ""
        lines = [
            f"audit{where}: {self.num_images} images ({splits}), {self.feature_dim}-d features"
        ]
        if self.sampled:
            lines.append(
                f"  sampled: every {self.sampled['every']}th image of each split, "
                f"{self.sampled['images']:,} of {self.sampled['of']:,} (max_images="
                f"{c.max_images:,}); pairs and suspects are among these"
            )
        if self.embedding:
            e = self.embedding
            kwargs = ",".join(f"{k}={v}" for k, v in (e.get("backbone_kwargs") or {}).items())
            size = "x".join(str(s) for s in e.get("image_size", ()))
            lines[-1] += (
                f" from {e.get('backbone')}{f'({kwargs})' if kwargs else ''} at {size}, "
                f"weights {e.get('weights')}"
            )
        by_splits = ", ".join(f"{k} {v}" for k, v in self.leaks_by_splits.items())
        lines.append(
            f"near-duplicates (cosine >= {c.duplicate_threshold:g}): {self.leak_count} pairs across "
            f"splits (leaks{': ' + by_splits if by_splits else ''}), {self.duplicate_count} within "
            "a split"
        )
        if self.leaked_items:
            lines.append(
                "  images with a near-duplicate in another split: "
                + ", ".join(f"{s} {n} of {self.splits[s]}" for s, n in self.leaked_items.items())
            )
        shown = [*self.leaks, *self.duplicates][:SUMMARY_LINES]  # leaks first
        lines += ["  " + _describe_pair(pair) for pair in shown]
        if self.leak_count + self.duplicate_count > len(shown):
            lines.append(
                f"  … {self.leak_count + self.duplicate_count - len(shown)} more pairs (audit.json "
                f"lists up to {c.max_pairs} of each kind)"
            )
        check = self.mislabel_check
        if not check.get("done"):
            lines.append(f"suspected mislabels: not checked ({check.get('reason')})")
        else:
            lines.append(
                f"suspected mislabels ({check['folds']}-fold linear probe, C={check['C']:.3g}, "
                f"cross-validated accuracy {check['accuracy']:.3f}; another class at p >= "
                f"{c.mislabel_confidence:g}): {self.mislabel_count} of {check['judged']}"
            )
            if check.get("classes_not_judged"):
                lines.append(
                    f"  not judged (fewer than {check['folds']} images): "
                    + ", ".join(check["classes_not_judged"])
                )
            for m in self.mislabels[:SUMMARY_LINES]:
                lines.append(
                    f"  {m['split']}:{m['item']} labelled {m['label']}, probe says "
                    f"{m['predicted']} (p={m['confidence']:.3f})"
                )
            if self.mislabel_count > SUMMARY_LINES:
                lines.append(f"  … {self.mislabel_count - SUMMARY_LINES} more")
        skipped, notes = self.data.get("skipped", []), self.data.get("notes", [])
        if skipped or notes:
            lines.append(
                f"files: {len(skipped)} skipped, {len(notes)} used after a conversion (not "
                "audited / audited as decoded):"
            )
            for s in [*skipped, *notes][:SUMMARY_LINES]:
                lines.append(f"  {s['path']}: {s['reason']}")
        lines.append(f"took {self.seconds:.1f}s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: what was checked, the thresholds, the counts and the lists."""
        out = dataclasses.asdict(self)
        out["num_images"] = self.num_images
        out["checked"] = [
            f"near-duplicate pairs within and across splits at cosine >= "
            f"{self.config.duplicate_threshold:g} of L2-normalised pooled features",
            (
                f"suspected mislabels: {self.config.folds}-fold linear probe predicting another "
                f"class with p >= {self.config.mislabel_confidence:g}"
                if self.mislabel_check.get("done")
                else f"suspected mislabels: skipped ({self.mislabel_check.get('reason')})"
            ),
        ]
        if self.sampled:
            out["checked"].append(
                f"a sample: every {self.sampled['every']}th image of each split, "
                f"{self.sampled['images']} of {self.sampled['of']}"
            )
        return json.loads(json.dumps(out, default=_json_default))

    def write_json(self, path: str | Path = "audit.json") -> Path:
        """Write ``to_dict()`` to ``path`` (folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _describe_pair(pair: dict[str, Any]) -> str:
    a, b = pair["a"], pair["b"]
    kind = "LEAK" if pair["leak"] else "dup "
    text = f"{kind} {pair['similarity']:.4f} {a['split']}:{a['item']} ~ {b['split']}:{b['item']}"
    if pair["identical"]:
        text += "  [identical]"
    if pair["labels_differ"]:
        text += f"  [labels differ: {a['label']} / {b['label']}]"
    return text


def check_config(config: Any) -> AuditConfig:
    """``config``, or the default ``AuditConfig`` for ``None``."""
    if config is None:
        return AuditConfig()
    return checks.instance("config", config, AuditConfig, "an AuditConfig")
