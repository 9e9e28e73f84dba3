"""The data audit's checks on pooled features: near-duplicate pairs (within and across splits) by a
blocked similarity product, and suspected mislabels by a cross-validated linear probe
(``audit_features``; see ``tlkeras.analysis.audit``)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tlkeras.analysis.audit_result import AuditConfig, AuditResult, check_config
from tlkeras.data import SPLITS
from tlkeras.fitting import head_solver

# At or above this similarity a pair is reported as identical (the same pixels after resizing, up
# to float32 rounding and JPEG re-encoding).
IDENTICAL_SIMILARITY = 0.9995
# Similarity-matrix elements per block (float32: 16 MiB).
BLOCK_ELEMENTS = 1 << 22


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
    """The strength of lowest log loss on the first fold of ``cv`` (fit on the others).

    One fold, early-stopped, not a 5-fold grid: on 8,000 CIFAR-10 images (MobileNet alpha=0.25
    features at 96 px) both chose C=0.01 for two fold seeds; the grid took 11 s in a training run,
    this about 2 s."""
    fit_rows, held = next(iter(cv.split(x, y)))
    c, _, _ = head_solver.validation_path(x[fit_rows], y[fit_rows], None, x[held], y[held], None)
    return c


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
        "C_chosen_by": "given" if config.probe_c is not None else "log loss on the first fold",
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
    config = check_config(config)
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
