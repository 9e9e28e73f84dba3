"""Phases: what one training phase is, how a run's phases are planned, and the one runner.

A :class:`Phase` is a strategy (which blocks train), a learning rate, an epoch budget and an
optimizer (AdamW, decaying kernels only). :func:`plan_phases` turns a :class:`TrainConfig` into the
recipe of the Keras transfer-learning guide: a head warm-up on the frozen backbone, then (for
``partial``/``full``) fine-tuning at a smaller learning rate; ``scratch`` is one phase.

:func:`run_phase` is the only place in tlkeras that compiles and fits a model: it applies the
phase's strategy (and the BatchNorm rules of ``tlkeras.strategy``), builds loss, metrics and
optimizer from the model's task, trains on the fast frozen path (``tlkeras.features.fit_frozen``)
when the phase allows it and plain ``model.fit`` otherwise, and turns a NaN loss into
:class:`LossNotFinite`. ``tlkeras.training.fit`` (run directories, resume, reports), the sweep and
source-task pre-training (``tlkeras.weights``) all call it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import distribute, features
from tlkeras.head_solver import GRADIENT, LBFGS, check_solver
from tlkeras.strategy import Strategy, apply_strategy, scratch_batchnorm
from tlkeras.task import infer, loss_for, metrics_for

# Phase plans hold strategies as their plain values: they are written to run_state.json.
SCRATCH, FEATURE_EXTRACTION = Strategy.SCRATCH.value, Strategy.FEATURE_EXTRACTION.value
PARTIAL, FULL = Strategy.PARTIAL.value, Strategy.FULL.value
HEAD_WARM_UP, FINE_TUNING = "head warm-up", "fine-tuning"
# The head's convergence rule on cached features (TrainConfig.converge_head).
CONVERGE_MAX_EPOCHS = 200
CONVERGE_PATIENCE = 20


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"TrainConfig.{name}: expected an int, received {value!r}")
    if value < minimum:
        raise ValueError(f"TrainConfig.{name}: expected an int >= {minimum}, received {value}")


def _check_float(name: str, value: Any, *, low: float, high: float | None, low_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"TrainConfig.{name}: expected a number, received {value!r}")
    value = float(value)
    bad = not math.isfinite(value) or (value <= low if low_open else value < low)
    bad = bad or (high is not None and value >= high)
    if bad:
        lo = f"{'>' if low_open else '>='} {low}"
        hi = f" and < {high}" if high is not None else ""
        raise ValueError(f"TrainConfig.{name}: expected a finite number {lo}{hi}, received {value}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a two-phase run. Validated on creation; scripts read these defaults.

    Attributes:
        epochs: phase 1 epochs (head warm-up on the frozen backbone); the whole budget for
            ``feature_extraction``.
        fine_tune_epochs: phase 2 epochs after ``apply_strategy`` unfreezes; 0 skips phase 2.
        learning_rate: AdamW learning rate of phase 1.
        fine_tune_learning_rate: phase 2 learning rate; ``None`` means ``learning_rate / 10``.
        batch_size: examples per batch and replica (``tlkeras.train`` batches the data by
            ``batch_size`` × replicas under a ``tf.distribute`` strategy).
        label_smoothing: for the cross-entropy losses, in ``[0, 1)``.
        weight_decay: AdamW decoupled weight decay (biases and normalisation parameters excluded).
        class_weight: ``"auto"`` (balanced from the training counts), a ``{class_index: weight}``
            dict, or ``None``.
        early_stopping_patience: epochs without validation-loss improvement before stopping
            (per phase); 0 disables early stopping.
        reduce_lr_on_plateau: halve the learning rate after ``max(1, patience // 2)`` flat epochs.
        fast: train on features of the frozen prefix computed once, when that is valid: the head
            warm-up (the whole backbone frozen) and ``partial`` fine-tuning (cached at block
            ``fine_tune_at``: the frozen blocks are not recomputed every epoch).
        augment_views: on the fast path of a model that augments, the augmented views of every
            training image computed once (plus the clean one; one is drawn per epoch). 0 trains
            the cached phases on clean features only.
        converge_head: on cached features an epoch of the head costs milliseconds, so the head
            warm-up trains to convergence there: until the validation loss has not improved for
            ``CONVERGE_PATIENCE`` epochs (at most ``CONVERGE_MAX_EPOCHS``), whatever ``epochs``
            and ``early_stopping_patience`` say. ``False``: exactly the budget above.
        refit: when the head warm-up is the last phase (``feature_extraction``) and ran on cached
            features, retrain the head from its initial weights on train + validation for the
            epoch count validation chose (the test split stays unseen).
        head_solver: how the head warm-up trains on cached features of the whole frozen backbone.
            ``"lbfgs"``: a linear head is solved to convergence (logistic regression, L2 strength
            chosen by validation log loss; ``tlkeras.head_solver``), ``epochs``,
            ``converge_head`` and the learning rate do not apply to it; heads it cannot solve
            (hidden layers, multi-label, label smoothing) train by ``"gradient"`` epochs, and the
            run says why.
        seed: seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``).
    """

    epochs: int = 10
    fine_tune_epochs: int = 10
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float | None = None
    batch_size: int = 32
    label_smoothing: float = 0.0
    weight_decay: float = 1e-4
    class_weight: str | dict | None = None
    early_stopping_patience: int = 3
    reduce_lr_on_plateau: bool = False
    fast: bool = True
    augment_views: int = features.DEFAULT_AUGMENT_VIEWS
    converge_head: bool = True
    refit: bool = True
    head_solver: str = LBFGS
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 0)
        _check_int("fine_tune_epochs", self.fine_tune_epochs, 0)
        if self.epochs + self.fine_tune_epochs == 0:
            raise ValueError(
                "TrainConfig: expected epochs + fine_tune_epochs >= 1, received 0 and 0"
            )
        _check_float("learning_rate", self.learning_rate, low=0.0, high=None, low_open=True)
        if self.fine_tune_learning_rate is not None:
            _check_float(
                "fine_tune_learning_rate",
                self.fine_tune_learning_rate,
                low=0.0,
                high=None,
                low_open=True,
            )
        _check_int("batch_size", self.batch_size, 1)
        _check_float("label_smoothing", self.label_smoothing, low=0.0, high=1.0, low_open=False)
        _check_float("weight_decay", self.weight_decay, low=0.0, high=None, low_open=False)
        _check_class_weight(self.class_weight)
        _check_int("early_stopping_patience", self.early_stopping_patience, 0)
        _check_int("seed", self.seed, 0)
        _check_int("augment_views", self.augment_views, 0)
        check_solver(self.head_solver, "TrainConfig.head_solver")
        for name in ("reduce_lr_on_plateau", "fast", "converge_head", "refit"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"TrainConfig.{name}: expected a bool, received {getattr(self, name)!r}"
                )

    @property
    def resolved_fine_tune_learning_rate(self) -> float:
        if self.fine_tune_learning_rate is not None:
            return float(self.fine_tune_learning_rate)
        return float(self.learning_rate) / 10.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.class_weight, Mapping):
            out["class_weight"] = {str(k): float(v) for k, v in self.class_weight.items()}
        return out


def _check_class_weight(cw: Any) -> None:
    if isinstance(cw, str):
        if cw != "auto":
            raise ValueError(
                f"TrainConfig.class_weight: expected 'auto', a dict or None, received {cw!r}"
            )
    elif isinstance(cw, Mapping):
        for k, v in cw.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
                raise ValueError(
                    "TrainConfig.class_weight: expected non-negative int class indices as "
                    f"keys, received {k!r}"
                )
            _check_float(f"class_weight[{k}]", v, low=0.0, high=None, low_open=True)
    elif cw is not None:
        raise TypeError(
            f"TrainConfig.class_weight: expected 'auto', a dict or None, received {cw!r}"
        )


@dataclass(frozen=True)
class Phase:
    """One phase of training: which blocks train, how fast and for how long.

    Attributes:
        name: shown in logs and recorded (``"head warm-up"``, ``"fine-tuning"``, ``"scratch"``…).
        strategy: a ``tlkeras.Strategy`` value; ``fine_tune_at`` its first trainable block.
        learning_rate, weight_decay: of the phase's AdamW (kernels decay; biases and BN do not).
        epochs: the phase's epoch budget (early stopping may end it sooner).
        fast: train on cached features of the frozen prefix when that is valid
            (``tlkeras.features.fast_path_plan``); never under ``tf.distribute``.
        converge: on the fast path with validation data, train until the validation loss has not
            improved for ``CONVERGE_PATIENCE`` epochs, at most ``max(epochs,
            CONVERGE_MAX_EPOCHS)`` (an ``EarlyStopping`` among the callbacks gets that patience).
        refit: on the fast path with validation data, then retrain what trains from its initial
            weights on train + validation for the best epoch count.
        augment_views: augmented views per training image on the fast path
            (``TrainConfig.augment_views``).
        solver: ``"lbfgs"`` solves a linear head on cached features of the whole frozen
            backbone to convergence (``tlkeras.head_solver``); ``"gradient"`` trains by epochs.
    """

    name: str
    strategy: str
    fine_tune_at: int | None
    learning_rate: float
    epochs: int
    weight_decay: float = 0.0
    fast: bool = False
    converge: bool = False
    refit: bool = False
    augment_views: int = features.DEFAULT_AUGMENT_VIEWS
    solver: str = GRADIENT

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy.parse(self.strategy).value)
        check_solver(self.solver, "Phase.solver")
        for name in ("fast", "converge", "refit"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Phase.{name}: expected a bool, received {getattr(self, name)!r}")
        _check_int("augment_views", self.augment_views, 0)
        if self.fine_tune_at is not None and self.strategy != PARTIAL:
            raise ValueError(
                f"Phase.fine_tune_at: expected None unless strategy='partial', received "
                f"{self.fine_tune_at} with strategy={self.strategy!r}"
            )
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, np.integer)):
            raise TypeError(f"Phase.epochs: expected an int, received {self.epochs!r}")
        if self.epochs < 1:
            raise ValueError(f"Phase.epochs: expected an int >= 1, received {self.epochs}")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < 0 or (name[0] == "l" and value == 0):
                bound = "> 0" if name == "learning_rate" else ">= 0"
                raise ValueError(
                    f"Phase.{name}: expected a finite number {bound}, received {value!r}"
                )
            object.__setattr__(self, name, float(value))

    def describe(self) -> str:
        return (
            f"strategy={self.strategy} fine_tune_at={self.fine_tune_at} "
            f"learning_rate={self.learning_rate:g}"
        )

    def optimizer(self) -> keras.optimizers.Optimizer:
        """A fresh AdamW for this phase (a new phase never inherits moments from the last)."""
        optimizer = keras.optimizers.AdamW(
            learning_rate=self.learning_rate, weight_decay=self.weight_decay
        )
        # Decay only kernels: decaying biases and BN scale/offset hurts and is not what L2 intends.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return optimizer


def plan_phases(strategy: str, fine_tune_at: int | None, config: TrainConfig) -> list[Phase]:
    """The phases of a ``strategy`` run under ``config`` (the two-phase recipe).

    ``scratch``: one phase of ``epochs + fine_tune_epochs`` at ``learning_rate``. Otherwise a head
    warm-up of ``epochs`` on the frozen backbone, then for ``partial``/``full`` fine-tuning for
    ``fine_tune_epochs`` at the fine-tuning learning rate. With ``config.fast`` the warm-up and
    ``partial`` fine-tuning train on cached features of what stays frozen.
    """
    strategy = Strategy.parse(strategy).value
    decay = float(config.weight_decay)
    if strategy == SCRATCH:
        total = config.epochs + config.fine_tune_epochs
        return [Phase(SCRATCH, SCRATCH, None, config.learning_rate, total, decay)]
    phases = []
    if config.epochs > 0:
        phases.append(
            Phase(
                HEAD_WARM_UP,
                FEATURE_EXTRACTION,
                None,
                config.learning_rate,
                config.epochs,
                decay,
                fast=config.fast,
                augment_views=config.augment_views,
                converge=config.converge_head,
                # Refitting on validation is only honest when no later phase early-stops on it.
                refit=config.refit and strategy == FEATURE_EXTRACTION,
                solver=config.head_solver,
            )
        )
    if strategy in (PARTIAL, FULL) and config.fine_tune_epochs > 0:
        lr = config.resolved_fine_tune_learning_rate
        phases.append(
            Phase(
                FINE_TUNING,
                strategy,
                fine_tune_at,
                lr,
                config.fine_tune_epochs,
                decay,
                fast=config.fast and strategy == PARTIAL,  # `full` has no frozen prefix
                augment_views=config.augment_views,
            )
        )
    if not phases:
        raise ValueError(
            f"strategy={strategy!r}: expected epochs >= 1 (it has no fine-tuning phase), received "
            f"epochs={config.epochs}"
        )
    return phases


class LossNotFinite(ValueError):
    """The loss became NaN or infinite: the learning rate is too large for this model."""


class LogLearningRate(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to the epoch logs (for CSV/TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.model.optimizer is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


@dataclass
class PhaseResult:
    """What :func:`run_phase` returns.

    Attributes:
        history: the Keras ``History`` of the fit.
        epochs_run: epochs this fit ran (early stopping may end a phase early).
        trainable_params: parameters the phase trained.
        fast_path: the fast path's mode when it trained the phase, else ``None``.
        note: why the fast path ran or did not (``"off"`` when the phase did not ask for it).
        seconds: wall time of the fit, feature caching included.
        refit: ``{"epochs", "examples"}`` (``{"examples", "solver", "C"}`` for a solved head) when
            the phase refit on train + validation, else ``None`` (the model then holds the refit
            weights, not the best-validation ones).
        solver: how a head on cached features trained (``tlkeras.head_solver``): the L-BFGS
            solution, or why it fell back to gradient epochs; ``None`` when not asked.
    """

    history: keras.callbacks.History
    epochs_run: int
    trainable_params: int
    fast_path: str | None
    note: str
    seconds: float
    refit: dict[str, Any] | None = None
    solver: dict[str, Any] | None = None


def trainable_params(model: keras.Model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def _fast_plan(model: keras.Model, phase: Phase) -> tuple[bool, str]:
    """``(use the fast path, why)`` for ``phase`` on ``model`` as its strategy left it."""
    if not phase.fast or phase.strategy not in (FEATURE_EXTRACTION, PARTIAL):
        return False, "off"
    if distribute.is_distributed(model.distribute_strategy):
        # Cached features would be computed on one device, outside the strategy.
        return False, "off under tf.distribute (the frozen phase trains end to end)"
    try:
        plan = features.fast_path_plan(model, phase.fine_tune_at, augment_views=phase.augment_views)
    except (ValueError, TypeError) as e:
        return False, f"not valid ({e})"
    return (True, plan.mode) if plan.valid else (False, plan.reason)


def _converging(
    phase: Phase, callbacks: Sequence[keras.callbacks.Callback], monitor: str
) -> tuple[int, list[keras.callbacks.Callback]]:
    """The epoch budget and callbacks of a phase trained to convergence (``Phase.converge``)."""
    out, stopping = [], False
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.EarlyStopping):
            # A copy: the caller's callback keeps its own patience for other phases.
            callback = copy.copy(callback)
            callback.patience = max(callback.patience, CONVERGE_PATIENCE)
            stopping = True
        out.append(callback)
    if not stopping:
        out.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=CONVERGE_PATIENCE, restore_best_weights=True
            )
        )
    return max(phase.epochs, CONVERGE_MAX_EPOCHS), out


def _check_finite(history: keras.callbacks.History, title: str, phase: Phase) -> None:
    losses = history.history.get("loss", [])
    bad = next((i for i, v in enumerate(losses) if v is None or not math.isfinite(v)), None)
    if bad is not None:
        epoch = history.epoch[bad] + 1 if history.epoch else bad + 1
        raise LossNotFinite(
            f"loss became NaN at epoch {epoch} ({title}) with learning_rate="
            f"{phase.learning_rate:g}; expected a smaller learning rate (learning_rate, "
            "fine_tune_learning_rate)"
        )


def run_phase(
    model: keras.Model,
    phase: Phase,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None = None,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    label_smoothing: float = 0.0,
    class_weight: dict[int, float] | None = None,
    initial_epoch: int = 0,
    train_bn: bool = False,
    seed: int = 0,
    title: str | None = None,
    run_dir: str | Path | None = None,
    verbose: int = 0,
) -> PhaseResult:
    """Train ``model`` through ``phase``: the one compile-and-fit of tlkeras.

    Args:
        model: a ``tlkeras.build_model`` model (its task comes from its ``predictions`` layer).
        phase: what trains, at which learning rate, for how long.
        train, validation: batched ``(image, label)`` datasets, labels encoded for the task.
        callbacks: passed to Keras (on the fast path they see the trained suffix; see
            ``tlkeras.features.SaveFullModel``). A phase that converges (``Phase.converge``, on
            the fast path with validation) uses a copy of their ``EarlyStopping`` with the
            convergence patience, or adds one.
        label_smoothing, class_weight: for the loss.
        initial_epoch: epochs already run in earlier phases (the epoch numbers continue).
        train_bn: let BatchNorm layers of trainable blocks update their statistics.
        seed: seeds the fast path's sampling of cached views.
        title: how logs and errors name the phase (default ``phase.name``).
        run_dir: named in the message when a multi-worker peer is lost.
        verbose: Keras verbosity; non-zero also prints one line describing the phase.

    Raises:
        LossNotFinite: the loss became NaN or infinite (names the epoch and learning rate).
    """
    apply_strategy(model, phase.strategy, phase.fine_tune_at, train_bn=train_bn)
    if phase.strategy == SCRATCH:
        scratch_batchnorm(model)
    task, from_logits = infer(model)
    scope = model.distribute_strategy
    loss = loss_for(task, from_logits=from_logits, label_smoothing=label_smoothing)
    with scope.scope():  # optimizer and metric variables live on every replica
        optimizer = phase.optimizer()
        metrics = metrics_for(task, from_logits=from_logits)
    fast, note = _fast_plan(model, phase)
    title = title or phase.name
    trainable = trainable_params(model)
    if verbose:
        print(
            f"{title}: {phase.describe()} trainable params={trainable:,} fast path: "
            f"{note if fast else 'no — ' + note}"
        )
    model._initial_epoch = None  # a stale value from an earlier fit would skip epochs
    started = time.perf_counter()
    if fast:
        epochs, callbacks = phase.epochs, list(callbacks)
        if phase.converge and validation is not None:
            epochs, callbacks = _converging(phase, callbacks, "val_loss")
        history = features.fit_frozen(
            model,
            train,
            validation,
            epochs=epochs,
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            callbacks=callbacks,
            fine_tune_at=phase.fine_tune_at,
            augment_views=phase.augment_views,
            class_weight=class_weight,
            seed=seed,
            verbose=verbose,
            initial_epoch=initial_epoch,
            refit_optimizer=phase.optimizer if phase.refit else None,
            solver=phase.solver,
        )
    else:
        with scope.scope():
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
        history = _fit(
            model,
            phase,
            train,
            validation,
            callbacks,
            class_weight,
            initial_epoch,
            run_dir,
            verbose,
        )
    model._initial_epoch = None
    seconds = time.perf_counter() - started
    _check_finite(history, title, phase)
    return PhaseResult(
        history=history,
        epochs_run=len(history.history.get("loss", [])),
        trainable_params=trainable,
        fast_path=note if fast else None,
        note=note,
        seconds=seconds,
        refit=getattr(history, "fast_path", {}).get("refit"),
        solver=getattr(history, "fast_path", {}).get("solver"),
    )


def _fit(
    model: keras.Model,
    phase: Phase,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    callbacks: Iterable[keras.callbacks.Callback],
    class_weight: dict[int, float] | None,
    initial_epoch: int,
    run_dir: str | Path | None,
    verbose: int,
) -> keras.callbacks.History:
    scope = model.distribute_strategy
    with (
        distribute.keras_fixes(scope),
        distribute.lost_worker_as_error(scope, run_dir),
        warnings.catch_warnings(),
    ):
        # One pass over the finite dataset is one epoch: Keras's "ran out of data" is noise.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        return model.fit(
            train,
            validation_data=validation,
            shuffle=False,  # the pipeline shuffles (seeded: the same order on every worker)
            epochs=initial_epoch + phase.epochs,
            initial_epoch=initial_epoch,
            callbacks=list(callbacks),
            class_weight=class_weight,
            verbose=verbose,
        )
