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
  log loss on the first fold over the solved head's grid (``tlkeras.fitting.head_solver.CS``, the
  early-stopped ``validation_path``): a fixed strength makes the probabilities, and so the count,
  arbitrary (measured on ants/bees, MobileNet alpha=0.25: 11–20 images flagged at C=1 over 3 fold
  seeds, 3–5 at the chosen C=0.03).
- **Size**: past ``AuditConfig.max_images`` images only every k-th image of each split is audited
  (embedding, pairs, probe), so the audit's time and memory stay bounded at any folder size; the
  result's ``sampled`` and its summary say so. Suspects are
  images to look at: atypical photos of the right class score there too. Multi-label data has no
  single label to disagree with: that part is skipped, and the result says so.

``audit_data`` is the one-call entry (load as a training run would, embed, audit); ``audit`` takes an
``ImageData`` and any embedding; ``audit_features`` (``tlkeras.analysis.audit_probes``) the feature
arrays themselves; ``AuditConfig`` and ``AuditResult`` are ``tlkeras.analysis.audit_result``'s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import checks
from tlkeras.analysis.audit_probes import audit_features
from tlkeras.analysis.audit_result import AuditConfig, AuditResult, check_config
from tlkeras.data import SPLITS, DataConfig, ImageData
from tlkeras.data.arrays import dataset_arrays
from tlkeras.fitting.feature_cache import batch_size_of
from tlkeras.fitting.loading import DataRequest, ModelRequest, load_and_build
from tlkeras.models.backbones import get_backbone
from tlkeras.models.builder import build_model

DEFAULT_BACKBONE = "MobileNet"
DEFAULT_WEIGHTS = "imagenet"


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
    *,
    features: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> AuditResult:
    """Embed every split of ``data`` (``ImageData.ordered``: unshuffled, in ``items`` order) with
    ``embed`` and audit the features (``audit_features``).

    ``embed`` maps a float32 ``[B, H, W, 3]`` batch of raw 0–255 pixels to pooled features
    ``[B, dim]``: the backbone's pooled output, what the head sees (``embedding_model``).
    ``features``: ``{split: (pooled features, labels)}`` already computed by the same embedding for
    whole splits, in ``ordered`` order (e.g. by the run's evaluation); those splits are not embedded
    again.
    """
    started = time.perf_counter()
    checks.instance("data", data, ImageData, "a tlkeras.data.ImageData")
    config = check_config(config)
    fn = _embedding_function(embed)
    present = [s for s in SPLITS if data.ordered(s) is not None]
    total = sum(len(data.items.get(s, ())) for s in present)
    every = math.ceil(total / config.max_images) if config.max_images else 1
    feats, labels, items = {}, {}, {}
    for split in present:
        dataset, names = data.ordered(split), list(data.items.get(split, ()))
        if features and split in features:
            x, y = (np.asarray(a) for a in features[split])
            if len(x) != len(names):
                raise ValueError(
                    f"features[{split!r}]: expected {len(names)} rows (the split's items), "
                    f"received {len(x)}"
                )
            x, y, names = x[::every], y[::every], names[::every]
        else:
            if every > 1:
                dataset, names = _every_kth(dataset, every), names[::every]
            x, y = _split_features(dataset, fn, split, len(names))
        if x is None:
            continue
        feats[split], labels[split], items[split] = x, y, names
    result = audit_features(feats, labels, items, data.class_names, config)
    sampled = {}
    if every > 1:
        sampled = {"every": every, "images": sum(len(v) for v in items.values()), "of": total}
    return dataclasses.replace(
        result,
        source=data.source,
        data=data.to_dict(),
        seconds=time.perf_counter() - started,
        sampled=sampled,
    )


def _every_kth(dataset: tf.data.Dataset, k: int) -> tf.data.Dataset:
    """Every ``k``-th example of a batched dataset (the first, the k+1-th…), batched as it was."""
    batch = batch_size_of(dataset) if dataset.cardinality() != 0 else 1
    return (
        dataset.unbatch()
        .enumerate()
        .filter(lambda i, _: i % k == 0)
        .map(lambda _, example: example)
        .batch(batch)
    )


def _split_features(
    dataset: Any, fn: Callable[[tf.Tensor], Any], split: str, num_items: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One split's pooled features and labels, in order; ``(None, None)`` when it has no batch.
    Raises when their count is not ``num_items`` (the split's ``items``)."""
    embedded = False

    def features(images: Any) -> np.ndarray:
        nonlocal embedded
        embedded = True
        out = np.asarray(fn(images))
        if out.ndim != 2 or len(out) != len(images):
            raise ValueError(
                f"embed: expected pooled features [batch, dim] for a batch of {len(images)}, "
                f"received shape {out.shape} (build the extractor with pooling, e.g. "
                "tlkeras.analysis.audit.embedding_model)"
            )
        return out

    try:
        x, y = dataset_arrays(dataset, map_images=features)
    except ValueError:
        if embedded:
            raise
        x = y = None  # no batch at all
    received = 0 if x is None else len(x)
    if num_items != received:
        raise ValueError(
            f"split {split!r}: expected {num_items} images (its items), "
            f"received {received} (a file changed since it was loaded?); "
            "load the data again"
        )
    return x, y


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
    config = check_config(config)
    spec = get_backbone(backbone)
    if backbone_kwargs is not None:
        checks.instance("backbone_kwargs", backbone_kwargs, dict, "a dict")
    request = ModelRequest(
        spec.name, backbone_kwargs, weights, image_size, strategy="feature_extraction"
    )
    source = DataRequest(
        data_source,
        validation=validation_data,
        validation_split=validation_split,
        test_split=test_split,
        max_bad_fraction=max_bad_fraction,
        batch_size=batch_size,
        seed=seed,
    )
    loaded = load_and_build(request, source, build=False)
    size = loaded.image_size
    embed = embedding_model(spec.name, loaded.weights, (*size, 3), loaded.backbone_kwargs)
    result = audit(loaded.data, embed, config)
    return dataclasses.replace(
        result,
        embedding={
            "backbone": spec.name,
            "backbone_kwargs": loaded.backbone_kwargs,
            "weights": None if loaded.weights is None else str(loaded.weights),
            "image_size": list(size),
            "pooling": "avg",
        },
        seconds=time.perf_counter() - started,
    )
