"""A data audit from backbone features, before any training: near-duplicates, leaks, mislabels.

Each image is embedded by a frozen pretrained backbone (its pooled output: what a tlkeras head
sees) and L2-normalised. Then:

- **Near-duplicates**: pairs whose cosine similarity reaches ``duplicate_threshold``, found by a
  blocked matrix product (a few MiB at a time, never the full ``N x N`` matrix). A pair within one
  split wastes capacity or over-weights an image; a pair *across* splits is a **leak**: the test
  (or validation) image was in effect trained on, and the score it gives is inflated.
- **Suspected mislabels**: a linear probe (scikit-learn logistic regression on the standardised
  features) predicts every labelled image from folds it was not fit on
  (``cross_val_predict(method="predict_proba")``); an image whose predicted class is not its label
  with probability at least ``mislabel_confidence`` is listed. The probe's L2 strength is chosen by
  cross-validated log loss over the solved head's grid (``tlkeras.fitting.head_solver.CS``): a fixed strength
  makes the probabilities, and so the count, arbitrary (measured on ants/bees, MobileNet
  alpha=0.25: 11–20 images flagged at C=1 over 3 fold seeds, 3–5 at the chosen C=0.03). Suspects are
  images to look at: atypical photos of the right class score there too. Multi-label data has no
  single label to disagree with: that part is skipped, and the result says so.

``audit_data`` is the one-call entry (load as a training run would, embed, audit); ``audit`` takes an
``ImageData`` and any embedding; ``audit_features`` the feature arrays themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras.data.sources import SPLITS, DataConfig, ImageData, load
from tlkeras.fitting import head_solver
from tlkeras.models import weights as weights_lib
from tlkeras.models.backbones import get_backbone
from tlkeras.models.builder import build_model

DEFAULT_BACKBONE = "MobileNet"
DEFAULT_WEIGHTS = "imagenet"
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
# At or above this similarity a pair is reported as identical (the same pixels after resizing, up
# to float32 rounding and JPEG re-encoding).
IDENTICAL_SIMILARITY = 0.9995
# Similarity-matrix elements per block (float32: 16 MiB).
BLOCK_ELEMENTS = 1 << 22
# Items printed per list by summary(); audit.json has up to max_pairs / max_mislabels.
SUMMARY_LINES = 10


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


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
            cross-validated log loss over ``tlkeras.fitting.head_solver.CS``.
        seed: seeds the probe's folds.
    """

    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD
    mislabel_confidence: float = DEFAULT_MISLABEL_CONFIDENCE
    folds: int = DEFAULT_FOLDS
    max_pairs: int = DEFAULT_MAX_PAIRS
    max_mislabels: int = DEFAULT_MAX_PAIRS
    probe_c: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("duplicate_threshold", "mislabel_confidence"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: expected a number in (0, 1], received {value!r}")
        for name, minimum in (("folds", 2), ("max_pairs", 0), ("max_mislabels", 0), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name}: expected an int >= {minimum}, received {value!r}")
        if self.probe_c is not None and (
            not _is_number(self.probe_c) or not math.isfinite(self.probe_c) or self.probe_c <= 0
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


# --------------------------------------------------------------------------------------------
# From features


def _check_inputs(features_by_split, labels_by_split, items_by_split, class_names):
    if not isinstance(features_by_split, Mapping) or not features_by_split:
        raise ValueError(
            "features_by_split: expected a non-empty {split: [n, dim] array} mapping, received "
            f"{features_by_split!r:.80}"
        )
    splits = [s for s in SPLITS if s in features_by_split]
    splits += [s for s in features_by_split if s not in splits]
    for name, mapping in (("labels_by_split", labels_by_split), ("items_by_split", items_by_split)):
        if not isinstance(mapping, Mapping) or set(mapping) != set(splits):
            keys = sorted(mapping) if isinstance(mapping, Mapping) else type(mapping).__name__
            raise ValueError(f"{name}: expected the splits {splits}, received {keys}")
    class_names = [str(c) for c in class_names]
    feats, labels, items = {}, {}, {}
    dim = None
    for s in splits:
        f = np.asarray(features_by_split[s], np.float32)
        y = np.asarray(labels_by_split[s])
        names = [str(i) for i in items_by_split[s]]
        if f.ndim != 2 or (dim is not None and f.shape[1] != dim):
            raise ValueError(
                f"features_by_split[{s!r}]: expected pooled features [n, {dim or 'dim'}], received "
                f"shape {f.shape}"
            )
        dim = f.shape[1]
        if not np.all(np.isfinite(f)):
            raise ValueError(f"features_by_split[{s!r}]: expected finite values, received NaN/inf")
        if len(y) != len(f) or len(names) != len(f):
            raise ValueError(
                f"split {s!r}: expected as many labels and items as feature rows ({len(f)}), "
                f"received {len(y)} labels and {len(names)} items"
            )
        if y.ndim == 2 and y.shape[1] != len(class_names):
            raise ValueError(
                f"labels_by_split[{s!r}]: expected multi-hot [n, {len(class_names)}], received "
                f"shape {y.shape}"
            )
        if y.ndim == 1 and len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise ValueError(
                f"labels_by_split[{s!r}]: expected class ids in [0, {len(class_names)}), received "
                f"[{y.min()}, {y.max()}]"
            )
        if y.ndim not in (1, 2):
            raise ValueError(
                f"labels_by_split[{s!r}]: expected class ids [n] or multi-hot [n, C], received "
                f"shape {y.shape}"
            )
        feats[s], labels[s], items[s] = f, y, names
    if len({labels[s].ndim for s in splits}) > 1:
        raise ValueError("labels_by_split: expected the same label form (ids or multi-hot) in all")
    return splits, feats, labels, items, class_names, dim


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero). Each row is divided by its largest
    magnitude first: tiny features (a randomly initialised backbone's are ~1e-17) would underflow
    when squared in float32."""
    peak = np.max(np.abs(x), axis=1, keepdims=True)
    x = x / np.where(peak > 0, peak, 1.0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def similar_pairs(x: np.ndarray, threshold: float, block_elements: int = BLOCK_ELEMENTS) -> Any:
    """Yield ``(i, j, similarity)`` arrays (``i < j``) of the rows of L2-normalised ``x`` whose dot
    product reaches ``threshold``, one block of rows at a time: each block's matrix has at most
    ``block_elements`` entries (rows ``[a, b)`` against rows ``[a, n)``)."""
    n = len(x)
    rows = max(1, min(n, block_elements // max(n, 1)))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = x[start:stop] @ x[start:].T
        r, c = np.nonzero(block >= threshold)
        keep = c > r  # upper triangle: each pair once, no self-pairs
        r, c = r[keep], c[keep]
        yield start + r, start + c, block[r, c]


def _top(keep: tuple[np.ndarray, ...], limit: int) -> tuple[np.ndarray, ...]:
    """The ``limit`` most similar of ``(i, j, s)``, most similar first."""
    i, j, s = keep
    if len(s) > limit:
        best = np.argpartition(-s, limit - 1)[:limit] if limit else np.array([], int)
        i, j, s = i[best], j[best], s[best]
    order = np.lexsort((j, i, -s))
    return i[order], j[order], s[order]


def _label_text(y: np.ndarray, class_names: list[str]) -> str:
    if np.ndim(y) == 0:
        return class_names[int(y)]
    return "+".join(class_names[k] for k in np.flatnonzero(y)) or "(none)"


def _duplicates(x, split_of, local, labels, items, splits, class_names, config):
    limit = config.max_pairs
    empty = (np.array([], int), np.array([], int), np.array([], np.float32))
    kept = {True: empty, False: empty}
    counts = {True: 0, False: 0}
    pair_splits = np.zeros(len(splits) ** 2, np.int64)  # leaks by (earlier split, later split)
    leaked = np.zeros(len(x), bool)
    for i, j, s in similar_pairs(x, config.duplicate_threshold):
        leak = split_of[i] != split_of[j]
        for flag in (True, False):
            mask = leak == flag
            counts[flag] += int(mask.sum())
            merged = tuple(
                np.concatenate([old, new[mask]])
                for old, new in zip(kept[flag], (i, j, s), strict=True)
            )
            kept[flag] = _top(merged, limit)
        codes = split_of[i[leak]] * len(splits) + split_of[j[leak]]
        pair_splits += np.bincount(codes, minlength=len(pair_splits))
        leaked[i[leak]] = leaked[j[leak]] = True

    def record(k: int) -> dict[str, Any]:
        s = splits[split_of[k]]
        y = labels[s][local[k]]
        return {"split": s, "item": items[s][local[k]], "label": _label_text(y, class_names)}

    def pairs(flag: bool) -> list[dict[str, Any]]:
        out = []
        for a, b, s in zip(*kept[flag], strict=True):
            ra, rb = record(a), record(b)
            out.append(
                {
                    "similarity": round(float(s), 6),
                    "identical": bool(s >= IDENTICAL_SIMILARITY),
                    "leak": flag,
                    "splits": [ra["split"], rb["split"]],
                    "labels_differ": ra["label"] != rb["label"],
                    "a": ra,
                    "b": rb,
                }
            )
        return out

    by_splits = {
        f"{splits[code // len(splits)]}/{splits[code % len(splits)]}": int(n)
        for code, n in enumerate(pair_splits)
        if n
    }
    per_split = np.bincount(split_of[leaked], minlength=len(splits))
    leaked_items = {s: int(n) for s, n in zip(splits, per_split, strict=True) if n}
    return pairs(True), counts[True], by_splits, leaked_items, pairs(False), counts[False]


def _choose_c(x: np.ndarray, y: np.ndarray, cv: Any) -> float:
    from sklearn.linear_model import LogisticRegressionCV

    search = LogisticRegressionCV(
        Cs=list(head_solver.CS),
        cv=cv,
        l1_ratios=(0.0,),
        scoring="neg_log_loss",
        max_iter=head_solver.MAX_ITER,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn's attribute-layout deprecation
        search.fit(x, y)
    return float(np.ravel(search.C_)[0])


def _mislabels(x, y, split_of, local, items, splits, class_names, config):
    """The probe's suspects, or why there are none to look for."""
    if y.ndim == 2:
        reason = (
            "multi-label data: an image's label is a set of classes, so a single-label probe "
            "has no one label to disagree with"
        )
        return [], 0, {"done": False, "reason": reason}
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    counts = np.bincount(y, minlength=len(class_names))
    judged_classes = np.flatnonzero(counts >= config.folds)
    small = [f"{class_names[k]} ({counts[k]})" for k in np.flatnonzero(counts < config.folds)]
    if len(judged_classes) < 2:
        reason = (
            f"expected at least 2 classes with {config.folds} or more images (one per fold), "
            f"received {len(judged_classes)}"
        )
        return [], 0, {"done": False, "reason": reason, "classes_not_judged": small}
    rows = np.flatnonzero(np.isin(y, judged_classes))
    xs, ys = StandardScaler().fit_transform(x[rows]), y[rows]
    cv = StratifiedKFold(config.folds, shuffle=True, random_state=config.seed)
    with threadpool_limits(head_solver.SOLVER_THREADS):
        c = config.probe_c if config.probe_c is not None else _choose_c(xs, ys, cv)
        probe = LogisticRegression(C=c, max_iter=head_solver.MAX_ITER)
        proba = cross_val_predict(probe, xs, ys, cv=cv, method="predict_proba")
    # Columns follow the sorted classes present: judged_classes.
    predicted = judged_classes[proba.argmax(axis=1)]
    confidence = proba.max(axis=1)
    label_probability = proba[np.arange(len(ys)), np.searchsorted(judged_classes, ys)]
    suspect = np.flatnonzero((predicted != ys) & (confidence >= config.mislabel_confidence))
    suspect = suspect[np.lexsort((rows[suspect], -confidence[suspect]))]
    listed = []
    for k in suspect[: config.max_mislabels]:
        s = splits[split_of[rows[k]]]
        listed.append(
            {
                "split": s,
                "item": items[s][local[rows[k]]],
                "label": class_names[ys[k]],
                "predicted": class_names[predicted[k]],
                "confidence": round(float(confidence[k]), 6),
                "label_probability": round(float(label_probability[k]), 6),
            }
        )
    check = {
        "done": True,
        "C": c,
        "C_chosen_by": "given" if config.probe_c is not None else "cross-validated log loss",
        "folds": config.folds,
        "judged": int(len(rows)),
        "accuracy": round(float(np.mean(predicted == ys)), 6),
        "classes_not_judged": small,
    }
    return listed, int(len(suspect)), check


def audit_features(
    features_by_split: Mapping[str, np.ndarray],
    labels_by_split: Mapping[str, np.ndarray],
    items_by_split: Mapping[str, Sequence[str]],
    class_names: Sequence[str],
    config: AuditConfig | None = None,
) -> AuditResult:
    """Audit pooled features: near-duplicates within and across splits, suspected mislabels.

    Args:
        features_by_split: ``{split: float [n, dim]}`` (any order of splits; ``train``,
            ``validation``, ``test`` are reported in that order).
        labels_by_split: ``{split: int [n]}`` class ids, or float/int multi-hot ``[n, C]`` (then
            the mislabel part is skipped, with the reason in ``mislabel_check``).
        items_by_split: ``{split: [n identifiers]}`` naming each row (``ImageData.items``).
        class_names: the class of each label id.
        config: an ``AuditConfig``.
    """
    started = time.perf_counter()
    config = _check_config(config)
    splits, feats, labels, items, class_names, dim = _check_inputs(
        features_by_split, labels_by_split, items_by_split, class_names
    )
    x = _normalise(np.concatenate([feats[s] for s in splits]))
    split_of = np.concatenate([np.full(len(feats[s]), k) for k, s in enumerate(splits)])
    local = np.concatenate([np.arange(len(feats[s])) for s in splits])
    leaks, leak_count, by_splits, leaked_items, dups, dup_count = _duplicates(
        x, split_of, local, labels, items, splits, class_names, config
    )
    y = np.concatenate([labels[s] for s in splits])
    if y.ndim == 1:
        y = y.astype(np.int64)
    mislabels, mislabel_count, check = _mislabels(
        x, y, split_of, local, items, splits, class_names, config
    )
    return AuditResult(
        config=config,
        class_names=class_names,
        splits={s: len(feats[s]) for s in splits},
        feature_dim=int(dim),
        leaks=leaks,
        leak_count=leak_count,
        leaks_by_splits=by_splits,
        leaked_items=leaked_items,
        duplicates=dups,
        duplicate_count=dup_count,
        mislabels=mislabels,
        mislabel_count=mislabel_count,
        mislabel_check=check,
        seconds=time.perf_counter() - started,
    )


def _check_config(config: Any) -> AuditConfig:
    if config is None:
        return AuditConfig()
    if not isinstance(config, AuditConfig):
        raise TypeError(f"config: expected an AuditConfig, received {type(config).__name__}")
    return config


# --------------------------------------------------------------------------------------------
# From images


def _embedding_function(embed: Any) -> Callable[[tf.Tensor], Any]:
    if isinstance(embed, keras.Model):
        spec = tf.TensorSpec(embed.inputs[0].shape, embed.inputs[0].dtype)
        # One trace for every batch size; no autograph (Keras layers need none).
        return tf.function(
            lambda images: embed(images, training=False), input_signature=[spec], autograph=False
        )
    if not callable(embed):
        raise TypeError(
            f"embed: expected a keras.Model or a callable images -> features, received "
            f"{type(embed).__name__}"
        )
    return embed


def audit(
    data: ImageData,
    embed: keras.Model | Callable[[tf.Tensor], Any],
    config: AuditConfig | None = None,
) -> AuditResult:
    """Embed every split of ``data`` (``ImageData.ordered``: unshuffled, in ``items`` order) with
    ``embed`` and audit the features (``audit_features``).

    ``embed`` maps a float32 ``[B, H, W, 3]`` batch of raw 0–255 pixels to pooled features
    ``[B, dim]``: the backbone's pooled output, what the head sees (``embedding_model``).
    """
    started = time.perf_counter()
    if not isinstance(data, ImageData):
        raise TypeError(
            f"data: expected a tlkeras.data.ImageData, received {type(data).__name__}"
        )
    config = _check_config(config)
    fn = _embedding_function(embed)
    feats, labels, items = {}, {}, {}
    for split in SPLITS:
        dataset = data.ordered(split)
        if dataset is None:
            continue
        parts, ys = [], []
        for images, y in dataset:
            out = np.asarray(fn(images))
            if out.ndim != 2 or len(out) != len(y):
                raise ValueError(
                    f"embed: expected pooled features [batch, dim] for a batch of {len(y)}, "
                    f"received shape {out.shape} (build the extractor with pooling, e.g. "
                    "tlkeras.analysis.audit.embedding_model)"
                )
            parts.append(out)
            ys.append(np.asarray(y))
        if len(data.items.get(split, ())) != sum(len(p) for p in parts):
            raise ValueError(
                f"split {split!r}: expected {len(data.items.get(split, ()))} images (its items), "
                f"received {sum(len(p) for p in parts)} (a file changed since it was loaded?); "
                "load the data again"
            )
        if not parts:
            continue
        feats[split], labels[split] = np.concatenate(parts), np.concatenate(ys)
        items[split] = data.items[split]
    result = audit_features(feats, labels, items, data.class_names, config)
    return dataclasses.replace(
        result,
        source=data.source,
        data=data.to_dict(),
        seconds=time.perf_counter() - started,
    )


def embedding_model(
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = DEFAULT_WEIGHTS,
    input_shape: tuple[int, int, int] | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> keras.Model:
    """Raw 0–255 pixels → the pooled backbone features a tlkeras head sees: ``tlkeras.build_model``
    (its preprocessing, the ``include_top=False`` backbone, average pooling, everything frozen) cut
    at the ``pool`` layer. ``weights`` as ``build_model`` takes them (resolved)."""

    model = build_model(
        backbone,
        2,
        strategy="feature_extraction",
        weights=weights,
        input_shape=input_shape,
        backbone_kwargs=backbone_kwargs,
    )
    return keras.Model(model.input, model.get_layer("pool").output, name=f"{model.name}_features")


def audit_data(
    data_source: Any,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = DEFAULT_WEIGHTS,
    image_size: int | tuple[int, int] | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    config: AuditConfig | None = None,
    validation_data: Any = None,
    validation_split: float = DataConfig.validation_split,
    test_split: float = DataConfig.test_split,
    seed: int = DataConfig.seed,
    max_bad_fraction: float = DataConfig.max_bad_fraction,
    batch_size: int = DataConfig.batch_size,
) -> AuditResult:
    """Audit a dataset before any training: load it, embed it with a frozen pretrained backbone,
    and look for near-duplicates, leaks across splits and suspected mislabels.

    The splits are the ones ``tlkeras.train`` makes with the same ``data_source``,
    ``validation_data``, ``validation_split``, ``test_split`` and ``seed`` (the split depends on
    nothing else). ``backbone``, ``weights`` (``"imagenet"``, a file, ``None``, ``"source:TASK"``),
    ``image_size`` and ``backbone_kwargs`` mean what they mean to ``tlkeras.train``.
    """

    started = time.perf_counter()
    config = _check_config(config)
    spec = get_backbone(backbone)
    if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
        raise TypeError(
            f"backbone_kwargs: expected a dict, received {type(backbone_kwargs).__name__}"
        )
    backbone_kwargs = weights_lib.backbone_kwargs_for(spec.name, backbone_kwargs, weights)
    size = weights_lib.image_size_for(image_size, weights, spec.name, data_source)
    data = load(
        data_source,
        validation=validation_data,
        image_size=size,
        batch_size=batch_size,
        validation_split=validation_split,
        test_split=test_split,
        seed=seed,
        max_bad_fraction=max_bad_fraction,
    )
    resolved = weights_lib.resolve(weights, spec.name, backbone_kwargs, (*size, 3))
    embed = embedding_model(spec.name, resolved, (*size, 3), backbone_kwargs)
    result = audit(data, embed, config)
    return dataclasses.replace(
        result,
        embedding={
            "backbone": spec.name,
            "backbone_kwargs": backbone_kwargs,
            "weights": None if resolved is None else str(resolved),
            "image_size": list(size),
            "pooling": "avg",
        },
        seconds=time.perf_counter() - started,
    )
