"""How well a backbone's frozen features fit labelled images, measured without training it.

- **LogME** (You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021): the log marginal likelihood (evidence) of a Bayesian linear model on the
  features, maximised over its prior and noise precisions, per sample and averaged over one-vs-rest
  class targets.
- **Linear probe**: cross-validated accuracy of a logistic regression (scikit-learn) on the pooled
  features, and its gain over a baseline (``probe_gain``).
- **The features**: one forward pass of the frozen backbone (``tlkeras.fitting.frozen``' prefix)
  over a stratified sample of the labelled images (``labelled_images``).

``tlkeras.analysis.advisor`` turns these measures into a recommendation and a ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from tlkeras.data.arrays import dataset_arrays
from tlkeras.fitting.feature_cache import cache_features
from tlkeras.fitting.frozen import split_at_block
from tlkeras.models.blocks import blocks
from tlkeras.models.builder import build_model

DEFAULT_PROBE_FOLDS = 5
DEFAULT_BATCH_SIZE = 32


# --------------------------------------------------------------------------------------------
# Scores


def logme(features: np.ndarray, labels: np.ndarray, *, max_iterations: int = 100) -> float:
    """LogME score of ``features`` for class ``labels`` (higher: the features fit the task better).

    You, Liu, Wang & Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning", ICML 2021 (Algorithm 1). For each class c, the one-vs-rest target y = [label == c]
    gets a Bayesian linear model y ~ N(F m, 1/β), m ~ N(0, I/α); α and β maximise the evidence
    p(y | F, α, β) by the paper's fixed-point iteration

        γ = Σ βσᵢ² / (α + βσᵢ²),   α ← γ / ‖m‖²,   β ← (n − γ) / ‖y − F m‖²,

    done in the basis of the SVD F = U diag(σ) Vᵀ, so each iteration costs O(min(n, d)). The score
    is the maximised log evidence divided by n, averaged over classes. It is invariant to a global
    scale of the features.

    Args:
        features: ``[n, d]`` float features (one row per image).
        labels: ``[n]`` int class ids.
        max_iterations: cap on fixed-point steps per class (it converges in a handful).

    Returns:
        The mean per-sample log evidence, a float.
    """
    f = np.asarray(features, dtype=np.float64)
    y_all = np.asarray(labels)
    if f.ndim != 2 or y_all.ndim != 1 or len(f) != len(y_all):
        raise ValueError(
            f"logme: expected features [n, d] and labels [n], received shapes {f.shape} and "
            f"{y_all.shape}"
        )
    classes = np.unique(y_all)
    if len(f) < 2 or len(classes) < 2:
        raise ValueError(
            f"logme: expected at least 2 samples of at least 2 classes, received {len(f)} "
            f"samples of {len(classes)} class(es)"
        )
    if not np.all(np.isfinite(f)):
        raise ValueError("logme: expected finite features, received NaN or inf")
    n, d = f.shape
    u, sigma, _ = np.linalg.svd(f, full_matrices=False)
    s = sigma**2  # eigenvalues of FᵀF in its range; the other d - r are 0
    r = len(s)
    evidences = []
    for c in classes:
        y = (y_all == c).astype(np.float64)
        z = u.T @ y  # y's coordinates in F's column space
        y_out = float(y @ y - z @ z)  # the part of y no linear model can fit
        alpha, beta = 1.0, 1.0
        for _ in range(max_iterations):
            shrink = alpha + beta * s
            gamma = float(np.sum(beta * s / shrink))
            m2 = float(np.sum((beta * sigma * z / shrink) ** 2))  # ‖m‖²
            res2 = y_out + float(np.sum((alpha * z / shrink) ** 2))  # ‖y − F m‖²
            new_alpha = gamma / max(m2, 1e-12)
            new_beta = (n - gamma) / max(res2, 1e-12)
            converged = abs(new_alpha / new_beta - alpha / beta) <= 1e-3 * (alpha / beta)
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        shrink = alpha + beta * s
        m2 = float(np.sum((beta * sigma * z / shrink) ** 2))
        res2 = y_out + float(np.sum((alpha * z / shrink) ** 2))
        log_det = float(np.sum(np.log(shrink))) + (d - r) * math.log(alpha)
        evidence = (
            d / 2 * math.log(alpha)
            + n / 2 * math.log(beta)
            - log_det / 2
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * math.log(2 * math.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def probe_accuracy(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    folds: int = DEFAULT_PROBE_FOLDS,
    c: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Cross-validated accuracy (mean, std over folds) of a standardised logistic-regression probe.

    Folds are stratified and capped by the smallest class (at least 2 examples per class needed).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    smallest = int(min(np.unique(labels, return_counts=True)[1]))
    if smallest < 2:
        raise ValueError(
            f"linear probe: expected at least 2 images in every class, received a class with "
            f"{smallest}"
        )
    cv = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    scores = cross_val_score(probe, features, labels, cv=cv)
    return float(scores.mean()), float(scores.std())


def probe_gain(accuracy: float, random_accuracy: float, chance: float) -> float:
    """Fraction of the error left by random features (or chance, if better) that pretrained
    features remove; negative when pretrained features do worse."""
    baseline = max(random_accuracy, chance)
    if baseline >= 1.0:
        return 0.0
    return (accuracy - baseline) / (1.0 - baseline)


# --------------------------------------------------------------------------------------------
# Features: one forward pass through the frozen backbone (tlkeras.fitting.frozen's prefix)


@dataclass(frozen=True)
class LabelledSample:
    """Labelled images (train + validation, never test), as features are computed from them."""

    images: Any  # tf.data.Dataset of (images, labels) batches
    labels: np.ndarray
    counts: dict[str, int]
    class_names: list[str]
    image_size: tuple[int, int]
    source: str


def labelled_images(data: Any, max_images: int, seed: int) -> LabelledSample:
    """Train + validation images (never test) as one dataset, stratified-sampled to ``max_images``
    (``seed`` draws the sample)."""
    if data.multilabel:
        raise ValueError("advise: expected single-label data, received multi-label data")
    x_all, y_all = dataset_arrays([data.train, data.validation], dtype="uint8")
    y_all = y_all.astype(np.int64)
    counts = {
        name: int(n)
        for name, n in zip(
            data.class_names, np.bincount(y_all, minlength=data.num_classes), strict=True
        )
    }
    if len(y_all) > max_images:
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(
            np.arange(len(y_all)),
            train_size=max_images,
            stratify=y_all,
            random_state=seed,
        )
        x_all, y_all = x_all[np.sort(keep)], y_all[np.sort(keep)]
    images_ds = tf.data.Dataset.from_tensor_slices((x_all, y_all)).batch(DEFAULT_BATCH_SIZE)
    images_ds = images_ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    return LabelledSample(
        images_ds, y_all, counts, list(data.class_names), tuple(data.image_size), str(data.source)
    )


def backbone_features(
    sample: LabelledSample, backbone: str, weights: Any, backbone_kwargs: dict[str, Any]
) -> tuple[np.ndarray, int]:
    """Pooled frozen features ``[n, C]`` and the backbone's block count."""
    model = build_model(
        backbone,
        max(2, len(sample.class_names)),
        strategy="feature_extraction",
        weights=weights,
        input_shape=(*sample.image_size, 3),
        backbone_kwargs=backbone_kwargs,
    )
    prefix, _ = split_at_block(model, None)
    cached = cache_features(prefix, sample.images)
    feats = np.concatenate([np.asarray(f).reshape(len(f), -1) for f, *_ in cached])
    return feats, len(blocks(model))
