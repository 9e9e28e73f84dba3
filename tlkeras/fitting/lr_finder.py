"""The learning-rate range test (Leslie Smith; fastai's ``lr_find``): which learning rate to train at.

:func:`find_lr` trains a **copy** of the model for at most ``steps`` batches while the learning rate
grows exponentially from ``min_lr`` to ``max_lr``, with the loss, optimizer and trainable blocks of
the phase it stands for, and records the exponentially smoothed loss. It stops
once the smoothed loss exceeds ``diverge_factor`` × its minimum (or is not finite). For the head
warm-up (``feature_extraction``) the sweep runs on cached features of the frozen backbone when the
fast path is valid (``tlkeras.fitting.frozen``): only the head trains, so a batch costs microseconds.

**Suggestion rule** (:data:`RULE`): the learning rate at the minimum of the smoothed loss divided by
10 (fastai's ``lr_min / 10``: the minimum is already at the edge of divergence), clipped into
``[min_lr, max_lr]``; as fastai, the first tenth of the sweep is left out (its average holds too few
batches). The steepest descent (most negative d smoothed-loss / d log lr, up to the minimum) is
recorded too. A loss that never falls below where that window starts is an error.

:func:`suggest_learning_rate`: the suggested learning rate of a run's first phase.
``tlkeras.workflows.training.find_lr_for`` (``scripts/find_lr.py``) loads the data and builds the model as
``tlkeras.train`` does, then calls :func:`find_lr`; ``train(learning_rate="auto")`` runs it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlkeras import checks
from tlkeras.fitting import reports
from tlkeras.fitting.compiling import compile_args, compile_model, set_trainable
from tlkeras.fitting.config import (
    FEATURE_EXTRACTION,
    FULL,
    PARTIAL,
    SCRATCH,
    Phase,
    TrainConfig,
    resolve_class_weight,
    set_seed,
)
from tlkeras.fitting.feature_cache import cache_features
from tlkeras.fitting.frozen import fast_path_plan, split_at_block
from tlkeras.models.spec import get_spec
from tlkeras.models.strategy import Strategy
from tlkeras.models.task import encode_labels, infer

DEFAULT_MIN_LR = 1e-7
DEFAULT_MAX_LR = 1.0
DEFAULT_STEPS = 100
# Fewer points than this make no curve: the smoothed loss is still mostly its first batches.
MIN_STEPS = 10
DEFAULT_DIVERGE_FACTOR = 4.0
DEFAULT_SMOOTHING = 0.98
RULE = (
    "learning rate at the minimum of the smoothed loss (past the sweep's first tenth) / 10 "
    "(fastai's lr_min / 10), clipped into [min_lr, max_lr]"
)


@dataclass(frozen=True)
class LRFinderResult:
    """What :func:`find_lr` measured and suggests.

    Attributes:
        lrs: the learning rate of each recorded batch (increasing).
        losses: the exponentially smoothed, bias-corrected loss at each of them.
        raw_losses: each batch's own training loss.
        suggestion: the suggested learning rate (:attr:`rule`).
        rule: how ``suggestion`` follows from the curve.
        steepest: the learning rate of the steepest descent of the smoothed loss up to its minimum
            (for information), past the first ``steps // 10`` batches.
        min_loss_lr: the learning rate at the minimum of the smoothed loss past the first
            ``steps // 10`` batches.
        stopped_early: the sweep ended before ``steps`` batches (the loss diverged).
        stop_reason: why the sweep ended.
        on_cached_features: the head trained on cached features of the frozen backbone.
        strategy, fine_tune_at: which blocks trained during the sweep.
        min_lr, max_lr, steps: the sweep asked for.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    raw_losses: tuple[float, ...]
    suggestion: float
    rule: str
    steepest: float
    min_loss_lr: float
    stopped_early: bool
    stop_reason: str
    on_cached_features: bool
    strategy: str
    fine_tune_at: int | None
    min_lr: float
    max_lr: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain floats and lists."""
        return {
            "suggestion": self.suggestion,
            "rule": self.rule,
            "steepest": self.steepest,
            "min_loss_lr": self.min_loss_lr,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "on_cached_features": self.on_cached_features,
            "strategy": self.strategy,
            "fine_tune_at": self.fine_tune_at,
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
            "steps": self.steps,
            "steps_run": len(self.lrs),
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "raw_losses": list(self.raw_losses),
        }

    def plot(self, path: str | Path) -> Path:
        """A PNG of the loss against the learning rate (log scale), the suggestion marked."""
        plt = reports.pyplot()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot(self.lrs, self.raw_losses, color="0.75", linewidth=0.8, label="batch loss")
        ax.plot(self.lrs, self.losses, color="C0", label="smoothed loss")
        ax.axvline(
            self.suggestion, color="C3", linestyle="--", label=f"suggestion {self.suggestion:.2g}"
        )
        ax.axvline(self.steepest, color="C2", linestyle=":", label=f"steepest {self.steepest:.2g}")
        ax.set_xscale("log")
        # The diverging tail can be orders of magnitude above the curve: keep the dip readable.
        low, start = min(self.losses), self.losses[0]
        ax.set_ylim(low - 0.1 * (start - low + 1e-12), start + 0.6 * (start - low + 1e-12))
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        where = "cached features" if self.on_cached_features else "end to end"
        ax.set_title(f"LR range test: {self.strategy} ({where})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def check_sweep(min_lr: Any, max_lr: Any, steps: Any) -> None:
    """Refuse a bad sweep (``ValueError``) before any data is read."""
    _check_args(min_lr, max_lr, steps, DEFAULT_DIVERGE_FACTOR, DEFAULT_SMOOTHING, True, 0)


def _check_args(
    min_lr: Any, max_lr: Any, steps: Any, diverge_factor: Any, smoothing: Any, fast: Any, seed: Any
) -> None:
    numbers = (("min_lr", min_lr), ("max_lr", max_lr), ("diverge_factor", diverge_factor))
    for name, value in (*numbers, ("smoothing", smoothing)):
        checks.number(name, value, finite=True)
    checks.number("min_lr", min_lr, low=0, low_open=True)
    if float(max_lr) <= float(min_lr):
        raise ValueError(f"max_lr: expected a number > min_lr={min_lr!r}, received {max_lr!r}")
    checks.integer("steps", steps, MIN_STEPS)
    checks.number("diverge_factor", diverge_factor, low=1, low_open=True)
    checks.interval("smoothing", smoothing, 0, 1, high_open=True)
    checks.boolean("fast", fast)
    checks.integer("seed", seed, 0)


def _phase(strategy: str, fine_tune_at: int | None, config: TrainConfig, lr: float) -> Phase:
    """The phase ``strategy`` stands for, as ``plan_phases`` makes it (its optimizer family; for
    fine-tuning its per-block learning rates) but at a constant ``lr``: no schedule or weight
    average, the sweep sets every batch's learning rate itself. Also checks ``fine_tune_at``."""
    fine_tuning = strategy in (PARTIAL, FULL)
    return Phase(
        "lr finder",
        strategy,
        fine_tune_at,
        lr,
        1,
        config.weight_decay,
        optimizer_name=config.optimizer,
        layer_decay=config.layer_decay if fine_tuning else 1.0,
    )


def _copy(model: keras.Model) -> keras.Model:
    """A model of its own (new layers and variables) with ``model``'s weights: the sweep's changes,
    trainable flags and BatchNorm statistics included, never reach the caller's model."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    spec = getattr(model, "_tlkeras_spec", None)
    if spec is not None:  # get_spec also reads it from the cloned preprocessing layer; faster
        object.__setattr__(clone, "_tlkeras_spec", spec)
    return clone


def _train_bn(model: keras.Model) -> bool:
    try:
        return bool(get_spec(model).train_bn)
    except (ValueError, AttributeError, KeyError):
        return False


def _sweep(
    trained: keras.Model,
    batches: Any,
    lrs: np.ndarray,
    class_weight: dict[int, float] | None,
    diverge_factor: float,
    smoothing: float,
) -> tuple[list[float], list[float], list[float], str | None]:
    """Train one batch per learning rate; ``(lrs, smoothed, raw, why it stopped early or None)``."""
    optimizer = trained.optimizer
    recorded, smoothed, raw = [], [], []
    average, best = 0.0, math.inf
    for i, (lr, element) in enumerate(zip(lrs, batches, strict=False)):
        optimizer.learning_rate.assign(float(lr))
        x, y = element[0], element[1]
        weights = element[2] if len(element) > 2 else None
        if class_weight is not None:
            # train_on_batch takes one or the other: fold the class weights into the row weights.
            ids = np.asarray(y)
            ids = ids.argmax(-1) if ids.ndim > 1 and ids.shape[-1] > 1 else ids.reshape(len(ids))
            by_class = np.array([class_weight.get(int(round(c)), 1.0) for c in ids], "float32")
            weights = by_class if weights is None else np.asarray(weights) * by_class
        logs = trained.train_on_batch(x, y, sample_weight=weights, return_dict=True)
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            return recorded, smoothed, raw, f"loss not finite at lr={lr:.3g}"
        average = smoothing * average + (1 - smoothing) * loss
        value = average / (1 - smoothing ** (i + 1))  # bias correction of the running average
        recorded.append(float(lr))
        smoothed.append(value)
        raw.append(loss)
        best = min(best, value)
        if value > diverge_factor * best:
            return (
                recorded,
                smoothed,
                raw,
                f"smoothed loss {value:.4g} > {diverge_factor:g} × its minimum {best:.4g} at "
                f"lr={lr:.3g}",
            )
    return recorded, smoothed, raw, None


def find_lr(
    model: keras.Model,
    data: Any,
    *,
    strategy: str = FEATURE_EXTRACTION,
    fine_tune_at: int | None = None,
    config: TrainConfig | None = None,
    min_lr: float = DEFAULT_MIN_LR,
    max_lr: float = DEFAULT_MAX_LR,
    steps: int = DEFAULT_STEPS,
    diverge_factor: float = DEFAULT_DIVERGE_FACTOR,
    smoothing: float = DEFAULT_SMOOTHING,
    fast: bool = True,
    seed: int = 0,
) -> LRFinderResult:
    """The learning-rate range test of ``model`` on ``data.train``; ``model`` is left untouched.

    A copy of ``model`` trains one batch per learning rate, ``min_lr`` to ``max_lr``
    exponentially over ``steps`` batches (the training split cycled when shorter), with
    ``strategy``'s trainable blocks (``tlkeras.apply_strategy``; ``scratch``: its BatchNorm rule),
    the task's loss with ``config.label_smoothing`` and ``config.class_weight``, and the phase's
    optimizer (``tlkeras.fitting.config.Phase.optimizer``: ``config.weight_decay``, the optimizer family
    and, for fine-tuning, the per-block learning rates training uses; no schedule). The sweep
    stops once the smoothed loss exceeds ``diverge_factor`` × its minimum or a loss is not
    finite.

    ``feature_extraction`` stands for the head warm-up (``TrainConfig.learning_rate``); with
    ``fast`` and a valid fast path the head trains on cached features of the frozen backbone (the
    clean view: augmentation does not move the learning-rate scale, and a view costs a forward
    pass over the training split). ``partial``/``full`` stand for fine-tuning and sweep end to end
    from the weights given: run them on a model whose head is trained (after phase 1), since a
    random head's gradients would decide the curve.

    The copy trains outside any ``tf.distribute`` strategy (on one device, at the batch size
    ``data`` was batched with); a ``mixed_float16`` model's optimizer is loss-scaled, as in
    ``run_phase``.

    Suggestion rule (``RULE``): the learning rate at the minimum of the smoothed loss / 10,
    clipped into ``[min_lr, max_lr]``, the first ``steps // 10`` batches left out (as fastai).

    Args:
        model: a ``tlkeras.build_model`` model (trainable flags and weights are read, not changed).
        data: a ``tlkeras.data.ImageData`` (its ``train`` split; int or multi-hot labels).
        strategy, fine_tune_at: which blocks train; ``fine_tune_at`` defaults to the model's own
            for ``partial``.
        config: ``label_smoothing``, ``weight_decay``, ``class_weight`` and the optimizer come
            from it (default ``TrainConfig()``); its learning rates, epochs, schedule, ``fast``
            and ``seed`` are not used (the arguments are).
        min_lr, max_lr: the range swept (``0 < min_lr < max_lr``).
        steps: batches at most (>= ``MIN_STEPS``).
        diverge_factor: stop when the smoothed loss exceeds this × its minimum (> 1).
        smoothing: of the exponential moving average of the loss, in ``[0, 1)``.
        fast: train the head on cached backbone features when that is valid.
        seed: seeds Keras (``keras.utils.set_random_seed``: dropout) and the cached batches' order.

    Raises:
        ValueError: a bad argument, or the loss never decreased (no learning rate to suggest).
    """
    _check_args(min_lr, max_lr, steps, diverge_factor, smoothing, fast, seed)
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig or None, received {config!r}")
    strategy = Strategy.parse(strategy).value
    if strategy == PARTIAL and fine_tune_at is None:
        try:
            fine_tune_at = get_spec(model).fine_tune_at
        except (ValueError, AttributeError, KeyError):
            fine_tune_at = None  # apply_strategy below says what is missing
    phase = _phase(strategy, fine_tune_at, config, float(min_lr))
    min_lr, max_lr = float(min_lr), float(max_lr)
    set_seed(int(seed))

    copy = _copy(model)
    set_trainable(copy, strategy, fine_tune_at, train_bn=_train_bn(model))
    task = infer(copy)[0]
    train = encode_labels(data.train, task, len(data.class_names))
    trained, batches, cached = copy, train, False
    if fast and strategy == FEATURE_EXTRACTION:
        plan = fast_path_plan(copy, None, augment_views=0)
        if plan.valid:
            prefix, trained = split_at_block(copy, None)
            # In memory when it fits, else in a temporary file cache; reshuffled on every pass.
            batches = cache_features(prefix, train, seed=int(seed), shuffle=True)
            cached = True
    # As run_phase compiles: the copy's blocks give the per-block rates, a float16 copy is
    # loss-scaled; the sweep sets every batch's learning rate and reads the loss only (no metrics).
    compile_model(trained, compile_args(copy, phase, config.label_smoothing, metrics=False))

    lrs = min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))
    recorded, smoothed, raw, why = _sweep(
        trained,
        batches.repeat(),  # cycles a split shorter than `steps` (reshuffled on each pass)
        lrs,
        resolve_class_weight(config, data, task),
        float(diverge_factor),
        float(smoothing),
    )
    return _result(recorded, smoothed, raw, why, strategy, phase, cached, min_lr, max_lr, steps)


def _result(
    lrs: list[float],
    smoothed: list[float],
    raw: list[float],
    why: str | None,
    strategy: str,
    phase: Phase,
    cached: bool,
    min_lr: float,
    max_lr: float,
    steps: int,
) -> LRFinderResult:
    """Apply the suggestion rule to a swept curve."""
    # As fastai: the first tenth of the sweep is left out of the rule, its average holds too few
    # batches (a lucky first batch would otherwise be the minimum).
    skip = steps // 10
    window = np.asarray(smoothed[skip:])
    if len(window) < 2 or int(np.argmin(window)) == 0:
        where = why or f"swept {len(smoothed)} batches"
        raise ValueError(
            f"the loss never decreased between min_lr={min_lr:g} and max_lr={max_lr:g} ({where}); "
            "expected a range whose low end learns slowly: lower min_lr, or check the data and labels"
        )
    lowest = skip + int(np.argmin(window))
    min_loss_lr = lrs[lowest]
    # Steepest on the way down to the minimum: past it the slope belongs to the divergence.
    slopes = np.gradient(np.asarray(smoothed), np.log10(np.asarray(lrs)))[skip : lowest + 1]
    steepest = lrs[skip + int(np.argmin(slopes))]
    return LRFinderResult(
        lrs=tuple(lrs),
        losses=tuple(smoothed),
        raw_losses=tuple(raw),
        suggestion=float(np.clip(min_loss_lr / 10.0, min_lr, max_lr)),
        rule=RULE,
        steepest=float(steepest),
        min_loss_lr=float(min_loss_lr),
        stopped_early=why is not None,
        stop_reason=why or f"swept all {steps} steps",
        on_cached_features=cached,
        strategy=strategy,
        fine_tune_at=phase.fine_tune_at,
        min_lr=min_lr,
        max_lr=max_lr,
        steps=int(steps),
    )


def find_first_phase_lr(
    model: keras.Model,
    data: Any,
    config: TrainConfig | None = None,
    *,
    strategy: str | None = None,
    steps: int = DEFAULT_STEPS,
) -> LRFinderResult:
    """:func:`find_lr` for a run's first phase, as ``tlkeras.train(learning_rate="auto")`` runs it.

    Call it on the loaded ``data`` and the built ``model`` before training: the head warm-up
    (``feature_extraction``, on cached features when ``config.fast``) for every strategy but
    ``scratch``, whose one phase trains everything. ``strategy`` defaults to the model's own.
    """
    config = config or TrainConfig()
    if strategy is None:
        try:
            strategy = get_spec(model).strategy
        except (ValueError, AttributeError, KeyError):
            strategy = FEATURE_EXTRACTION
    swept = SCRATCH if Strategy.parse(strategy).value == SCRATCH else FEATURE_EXTRACTION
    return find_lr(
        model, data, strategy=swept, config=config, steps=steps, fast=config.fast, seed=config.seed
    )


def suggest_learning_rate(
    model: keras.Model,
    data: Any,
    config: TrainConfig | None = None,
    *,
    strategy: str | None = None,
    steps: int = DEFAULT_STEPS,
    plot: str | Path | None = None,
    verbose: int = 0,
) -> float:
    """The suggested learning rate of :func:`find_first_phase_lr`. ``plot``: also write the curve
    there. ``verbose``: print the suggestion and the rule."""
    result = find_first_phase_lr(model, data, config, strategy=strategy, steps=steps)
    if plot is not None:
        result.plot(plot)
    if verbose:
        print(f"learning_rate=auto: {result.suggestion:.3g} ({result.rule}; {result.stop_reason})")
    return result.suggestion
