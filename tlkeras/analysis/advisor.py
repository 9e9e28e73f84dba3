"""Which strategy, and how many blocks? A recommendation from measurements, not a guess.

The rule of thumb crosses dataset size with how *similar* the data is to what the backbone was
pre-trained on (CS231n transfer-learning notes; Yosinski et al. 2014):

| case | size  | similar | strategy             | why                                                  |
|------|-------|---------|----------------------|------------------------------------------------------|
| 1    | large | yes     | `partial`, late k    | features fit; enough data to adapt the last blocks   |
| 2    | large | no      | `full`               | enough data to move every block from a good init     |
| 3    | small | yes     | `feature_extraction` | features fit; training more would overfit            |
| 4    | small | no      | `partial`, last third + augmentation | the hard case: adapt a few blocks, guard them |

*Size* counts the labelled images (``AdvisorConfig.small_max_images``, 1000 by default). *Similarity*
is measured from one forward pass of the frozen backbone over the data:

- **Linear-probe gain**: cross-validated accuracy of a logistic regression (scikit-learn) on the
  pooled pretrained features, against the same on the features of the *same architecture with
  random weights*. ``probe_gain = (acc_pretrained - baseline) / (1 - baseline)`` with
  ``baseline = max(acc_random, chance)`` is the fraction of the remaining error that the
  pretrained features remove; the data is *similar* when it reaches ``min_probe_gain``.
- **LogME** (You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021): the log marginal likelihood (evidence) of a Bayesian linear model on the
  features, maximised over its prior and noise precisions, per sample and averaged over one-vs-rest
  class targets. Reported for both weight sets, and what ``rank_backbones`` ranks by.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import checks
from tlkeras.analysis.inputs import as_image_data
from tlkeras.analysis.transferability import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PROBE_FOLDS,
    backbone_features,
    labelled_images,
    logme,
    probe_accuracy,
    probe_gain,
)
from tlkeras.data import DataConfig
from tlkeras.fitting.config import set_seed
from tlkeras.fitting.pretrain import resolve
from tlkeras.models.backbones import get_backbone

DEFAULT_SMALL_MAX_IMAGES = 1000
DEFAULT_MIN_PROBE_GAIN = 0.5
DEFAULT_MAX_IMAGES = (
    2000  # features of at most this many images (stratified sample): one pass stays cheap
)


class Case(enum.IntEnum):
    """The four cases of the size × similarity rule of thumb."""

    LARGE_SIMILAR = 1
    LARGE_DISSIMILAR = 2
    SMALL_SIMILAR = 3
    SMALL_DISSIMILAR = 4

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " + ")

    @classmethod
    def of(cls, small: bool, similar: bool) -> Case:
        if small:
            return cls.SMALL_SIMILAR if similar else cls.SMALL_DISSIMILAR
        return cls.LARGE_SIMILAR if similar else cls.LARGE_DISSIMILAR


@dataclass(frozen=True)
class AdvisorConfig:
    """Thresholds and recipes of ``advise``. Every number the decision uses is here.

    Attributes:
        small_max_images: data with at most this many labelled images is *small*.
        min_probe_gain: data is *similar* when the linear-probe gain reaches this (see module doc).
        large_similar_trainable_fraction: case 1 trains this fraction of the blocks (the last ones).
        small_dissimilar_trainable_fraction: case 4 trains this fraction of the blocks.
        learning_rate: head learning rate (phase 1) of every case.
        fine_tune_learning_rate: phase-2 learning rate of ``partial`` (cases 1 and 4).
        full_learning_rate: phase-2 learning rate of ``full`` (case 2): smaller, every block moves.
        max_images: features are computed on at most this many images (stratified sample).
        probe_folds: cross-validation folds of the linear probe (fewer if a class is smaller).
        probe_c: inverse L2 strength of the probe's ``LogisticRegression``.
        seed: seeds the sample, the folds and the random backbone.
        max_bad_fraction: a data folder fails to load when more than this fraction of its files
            are unusable (``tlkeras.data.DataConfig``).
    """

    # metadata: the options as scripts/advise.py shows them (tlkeras.cli.define_config_flags).
    small_max_images: int = field(
        default=DEFAULT_SMALL_MAX_IMAGES,
        metadata={"help": "Data with at most this many images is small."},
    )
    min_probe_gain: float = field(
        default=DEFAULT_MIN_PROBE_GAIN,
        metadata={"help": "Linear-probe gain at or above which data is similar."},
    )
    large_similar_trainable_fraction: float = 0.25
    small_dissimilar_trainable_fraction: float = 1 / 3
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-4
    full_learning_rate: float = 1e-5
    max_images: int = field(
        default=DEFAULT_MAX_IMAGES,
        metadata={"help": "Score at most this many images (a sample)."},
    )
    probe_folds: int = DEFAULT_PROBE_FOLDS
    probe_c: float = 1.0
    seed: int = field(
        default=0,
        metadata={"help": "Seeds the sample, the probe folds and the random backbone."},
    )
    max_bad_fraction: float = DataConfig.max_bad_fraction

    def __post_init__(self) -> None:
        checks.integer("AdvisorConfig.small_max_images", self.small_max_images, 1)
        checks.interval("AdvisorConfig.min_probe_gain", self.min_probe_gain, 0, 1)
        for name in ("large_similar_trainable_fraction", "small_dissimilar_trainable_fraction"):
            checks.interval(f"AdvisorConfig.{name}", getattr(self, name), 0, 1, low_open=True)
        for name in ("learning_rate", "fine_tune_learning_rate", "full_learning_rate", "probe_c"):
            checks.number(f"AdvisorConfig.{name}", getattr(self, name), low=0, low_open=True)
        checks.integer("AdvisorConfig.max_images", self.max_images, 4)
        checks.integer("AdvisorConfig.probe_folds", self.probe_folds, 2)
        checks.integer("AdvisorConfig.seed", self.seed, 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# The labelled images and their features (tlkeras.analysis.transferability)


def _as_data(data: Any, image_size: Any, backbone: str, weights: Any, config: AdvisorConfig):
    # Advice looks at every labelled image: no split is held out (nothing is trained here).
    return as_image_data(
        data,
        image_size,
        weights,
        backbone,
        batch_size=DEFAULT_BATCH_SIZE,
        validation_split=0.0,
        test_split=0.0,
        max_bad_fraction=config.max_bad_fraction,
    )


def _resolve_weights(weights: Any, backbone: str, backbone_kwargs: dict, image_size) -> Any:
    return resolve(weights, backbone, backbone_kwargs, (*image_size, 3))


# --------------------------------------------------------------------------------------------
# Advice


@dataclass(frozen=True)
class Advice:
    """A recommendation and the evidence behind it (``summary()`` prints both)."""

    case: Case
    strategy: str
    fine_tune_at: int | None
    learning_rate: float
    fine_tune_learning_rate: float | None
    augment: bool
    backbone: str
    backbone_kwargs: dict[str, Any]
    weights: str | None
    image_size: tuple[int, int]
    num_images: int
    images_per_class: dict[str, int]
    num_blocks: int
    small: bool
    similar: bool
    logme: float
    logme_random: float
    probe_accuracy: float
    probe_accuracy_std: float
    probe_accuracy_random: float
    chance: float
    probe_gain: float
    images_scored: int
    seconds: float
    config: AdvisorConfig = field(default_factory=AdvisorConfig)

    @property
    def case_name(self) -> str:
        return self.case.label

    def summary(self) -> str:
        c = self.config
        k = f", fine_tune_at={self.fine_tune_at}" if self.fine_tune_at is not None else ""
        ft = (
            f", fine_tune_learning_rate={self.fine_tune_learning_rate:g}"
            if self.fine_tune_learning_rate is not None
            else ""
        )
        per_class = ", ".join(f"{n}={v}" for n, v in self.images_per_class.items())
        lines = [
            f"case {int(self.case)} ({self.case_name}): strategy={self.strategy}{k}, "
            f"learning_rate={self.learning_rate:g}{ft}, augment={self.augment}",
            "evidence:",
            f"  size: {self.num_images} labelled images ({per_class}); small means <= "
            f"{c.small_max_images} -> {'small' if self.small else 'large'}",
            f"  linear probe ({self.images_scored} images, {c.probe_folds}-fold CV): pretrained "
            f"{self.probe_accuracy:.3f} ± {self.probe_accuracy_std:.3f}, random-init "
            f"{self.probe_accuracy_random:.3f}, chance {self.chance:.3f}",
            f"  probe gain (pretrained vs max(random, chance), share of the error removed): "
            f"{self.probe_gain:.3f}; similar means >= {c.min_probe_gain:g} -> "
            f"{'similar' if self.similar else 'dissimilar'}",
            f"  LogME (You et al. 2021, per-sample log evidence): pretrained {self.logme:.4f}, "
            f"random-init {self.logme_random:.4f}",
            f"  backbone {self.backbone} {self.backbone_kwargs or ''} at "
            f"{self.image_size[0]}x{self.image_size[1]}: {self.num_blocks} blocks; "
            f"weights {self.weights}",
        ]
        if self.fine_tune_at is not None:
            lines.append(
                f"  fine_tune_at={self.fine_tune_at}: blocks {self.fine_tune_at}..."
                f"{self.num_blocks - 1} train ({self.num_blocks - self.fine_tune_at} of "
                f"{self.num_blocks})"
            )
        lines.append(
            f"disagree? change AdvisorConfig thresholds, or run tlkeras.workflows.sweep over fine_tune_at "
            f"(took {self.seconds:.1f}s)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["case"] = int(self.case)
        out["case_name"] = self.case_name
        out["image_size"] = list(self.image_size)
        return out


@dataclass(frozen=True)
class Recipe:
    """What a case means for a backbone with ``num_blocks`` blocks."""

    strategy: str
    fine_tune_at: int | None
    learning_rate: float
    fine_tune_learning_rate: float | None
    augment: bool


def _trainable_tail(num_blocks: int, fraction: float) -> int:
    """``fine_tune_at`` training the last ``fraction`` of the blocks (at least 1, at most n-1)."""
    trainable = min(num_blocks - 1, max(1, math.ceil(num_blocks * fraction)))
    return num_blocks - trainable


def recipe(case: Case | int, num_blocks: int, config: AdvisorConfig | None = None) -> Recipe:
    """The strategy, ``fine_tune_at``, learning rates and augmentation of ``case``."""
    config = config or AdvisorConfig()
    case = Case(case)
    checks.integer("num_blocks", num_blocks, 2)
    small = case in (Case.SMALL_SIMILAR, Case.SMALL_DISSIMILAR)
    if case is Case.LARGE_SIMILAR:
        k = _trainable_tail(num_blocks, config.large_similar_trainable_fraction)
        return Recipe("partial", k, config.learning_rate, config.fine_tune_learning_rate, small)
    if case is Case.LARGE_DISSIMILAR:
        return Recipe("full", None, config.learning_rate, config.full_learning_rate, small)
    if case is Case.SMALL_SIMILAR:
        return Recipe("feature_extraction", None, config.learning_rate, None, small)
    k = _trainable_tail(num_blocks, config.small_dissimilar_trainable_fraction)
    return Recipe("partial", k, config.learning_rate, config.fine_tune_learning_rate, small)


def decide(num_images: int, gain: float, config: AdvisorConfig | None = None) -> Case:
    """The case for ``num_images`` labelled images and a linear-probe gain of ``gain``."""
    config = config or AdvisorConfig()
    checks.integer("num_images", num_images, 0)
    return Case.of(
        small=num_images <= config.small_max_images, similar=gain >= config.min_probe_gain
    )


def _check_kwargs(backbone_kwargs: Any) -> dict[str, Any]:
    if backbone_kwargs is None:
        return {}
    return dict(checks.instance("backbone_kwargs", backbone_kwargs, dict, "a dict"))


def advise(
    data: Any,
    backbone: str,
    *,
    weights: str | None = "imagenet",
    backbone_kwargs: dict[str, Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
    config: AdvisorConfig | None = None,
    verbose: bool = False,
) -> Advice:
    """Recommend a strategy for fine-tuning ``backbone`` on ``data``, with the evidence.

    One forward pass of the frozen pretrained backbone and one of the same architecture with random
    weights over the labelled images (train + validation splits; never test) give the LogME scores
    and the linear-probe accuracies; their gain decides *similar*, the image count decides *small*,
    and ``recipe`` turns the case into settings for ``tlkeras.build_model`` / ``training.fit``.

    Args:
        data: a ``tlkeras.data.ImageData`` or anything ``tlkeras.data.load`` accepts (then loaded
            whole, at ``image_size``: default ``"auto"``, chosen from the data's resolution by
            ``tlkeras.models.weights.auto_image_size``).
        backbone: a ``tlkeras.backbone_names()`` entry.
        weights: ``"imagenet"``, a weights file, or ``"source:TASK"`` (``tlkeras.fitting.pretrain``).
        backbone_kwargs: constructor arguments, e.g. ``{"alpha": 0.25}``.
        config: thresholds and recipes (``AdvisorConfig``).
        verbose: print the summary.

    Returns:
        An ``Advice``.
    """
    started = time.perf_counter()
    config = config or AdvisorConfig()
    checks.instance("config", config, AdvisorConfig, "an AdvisorConfig")
    spec = get_backbone(backbone)
    if weights is None:
        raise ValueError(
            "weights: advise compares pretrained with random features; expected 'imagenet', a "
            "weights file or 'source:TASK', received None"
        )
    backbone_kwargs = _check_kwargs(backbone_kwargs)
    data = _as_data(data, image_size, spec.name, weights, config)
    sample = labelled_images(data, config.max_images, config.seed)
    resolved = _resolve_weights(weights, spec.name, backbone_kwargs, sample.image_size)

    pretrained, num_blocks = backbone_features(sample, spec.name, resolved, backbone_kwargs)
    set_seed(config.seed)
    random_feats, _ = backbone_features(sample, spec.name, None, backbone_kwargs)

    y = sample.labels
    acc, acc_std = probe_accuracy(
        pretrained, y, folds=config.probe_folds, c=config.probe_c, seed=config.seed
    )
    acc_random, _ = probe_accuracy(
        random_feats, y, folds=config.probe_folds, c=config.probe_c, seed=config.seed
    )
    chance = float(np.bincount(y).max() / len(y))  # majority-class accuracy
    gain = probe_gain(acc, acc_random, chance)
    num_images = sum(sample.counts.values())
    case = decide(num_images, gain, config)
    r = recipe(case, num_blocks, config)
    advice = Advice(
        case=case,
        strategy=r.strategy,
        fine_tune_at=r.fine_tune_at,
        learning_rate=r.learning_rate,
        fine_tune_learning_rate=r.fine_tune_learning_rate,
        augment=r.augment,
        backbone=spec.name,
        backbone_kwargs=backbone_kwargs,
        weights=None if resolved is None else str(resolved),
        image_size=tuple(sample.image_size),
        num_images=num_images,
        images_per_class=sample.counts,
        num_blocks=num_blocks,
        small=case in (Case.SMALL_SIMILAR, Case.SMALL_DISSIMILAR),
        similar=case in (Case.LARGE_SIMILAR, Case.SMALL_SIMILAR),
        logme=logme(pretrained, y),
        logme_random=logme(random_feats, y),
        probe_accuracy=acc,
        probe_accuracy_std=acc_std,
        probe_accuracy_random=acc_random,
        chance=chance,
        probe_gain=gain,
        images_scored=len(y),
        seconds=time.perf_counter() - started,
        config=config,
    )
    if verbose:
        print(advice.summary(), flush=True)
    return advice


# --------------------------------------------------------------------------------------------
# Ranking backbones


@dataclass(frozen=True)
class Ranking:
    """One candidate backbone's transferability to the data (higher LogME first)."""

    backbone: str
    backbone_kwargs: dict[str, Any]
    weights: str | None
    logme: float
    probe_accuracy: float
    feature_dim: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_candidate(candidate: Any) -> tuple[str, dict[str, Any], Any]:
    if isinstance(candidate, str):
        return candidate, {}, "imagenet"
    if not isinstance(candidate, (tuple, list)) or not 1 <= len(candidate) <= 3:
        raise ValueError(
            f"candidates: expected (name, kwargs, weights) tuples, received {candidate!r}"
        )
    name, kwargs, weights = (*candidate, {}, "imagenet")[:3]
    return name, _check_kwargs(kwargs), weights


def rank_backbones(
    data: Any,
    candidates: Sequence[tuple[str, dict[str, Any] | None, str | None] | str],
    *,
    image_size: int | tuple[int, int] | None = None,
    config: AdvisorConfig | None = None,
) -> list[Ranking]:
    """Rank candidate backbones for ``data`` by LogME, one forward pass each (best first).

    Each candidate is ``(name, backbone_kwargs, weights)`` (a bare name means ``{}`` and
    ``"imagenet"``). All candidates see the same images at the same size (``data``'s, or
    ``image_size``, default the first candidate's size), so the scores compare. The probe
    accuracy is reported alongside (cross-validated, as in ``advise``).
    """
    config = config or AdvisorConfig()
    if (
        isinstance(candidates, (str, bytes))
        or not isinstance(candidates, Sequence)
        or not candidates
    ):
        raise ValueError(
            f"candidates: expected a non-empty list of (name, kwargs, weights), received "
            f"{candidates!r}"
        )
    parsed = [_check_candidate(c) for c in candidates]
    for name, _, _ in parsed:
        get_backbone(name)
    data = _as_data(data, image_size, parsed[0][0], parsed[0][2], config)
    sample = labelled_images(data, config.max_images, config.seed)
    rows = []
    for name, kwargs, weights in parsed:
        started = time.perf_counter()
        resolved = _resolve_weights(weights, name, kwargs, sample.image_size)
        set_seed(config.seed)  # random-init candidates: the same draw each call
        feats, _ = backbone_features(sample, name, resolved, kwargs)
        acc, _ = probe_accuracy(
            feats, sample.labels, folds=config.probe_folds, c=config.probe_c, seed=config.seed
        )
        rows.append(
            Ranking(
                backbone=get_backbone(name).name,
                backbone_kwargs=kwargs,
                weights=None if resolved is None else str(resolved),
                logme=logme(feats, sample.labels),
                probe_accuracy=acc,
                feature_dim=int(feats.shape[1]),
                seconds=time.perf_counter() - started,
            )
        )
    return sorted(rows, key=lambda r: r.logme, reverse=True)


def _short(weights: str | None) -> str:
    text = "random init" if weights is None else Path(weights).name
    return text if len(text) < 27 else text[:12] + "..." + text[-12:]


def ranking_table(rows: Sequence[Ranking]) -> str:
    """The ranking as a fixed-width table."""
    header = (
        f"{'#':>2}  {'backbone':<28}{'weights':<28}{'LogME':>10}{'probe acc':>11}{'dim':>7}"
        f"{'sec':>7}"
    )
    lines = [header, "-" * len(header)]
    for i, r in enumerate(rows, start=1):
        kw = ",".join(f"{k}={v}" for k, v in r.backbone_kwargs.items())
        name = f"{r.backbone}({kw})" if kw else r.backbone
        lines.append(
            f"{i:>2}  {name:<28}{_short(r.weights):<28}{r.logme:>10.4f}{r.probe_accuracy:>11.3f}{r.feature_dim:>7}"
            f"{r.seconds:>7.1f}"
        )
    return "\n".join(lines)
