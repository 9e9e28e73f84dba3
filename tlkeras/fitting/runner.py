"""The one runner: :func:`run_phase` trains a model through one phase.

It sets which blocks train (``tlkeras.fitting.compiling``: the phase's strategy and the BatchNorm
rules of ``tlkeras.models.strategy``), builds loss, metrics and optimizer from the model's task and
the phase, trains on the fast frozen path (``tlkeras.fitting.fast_path.fit_frozen``) when the phase
allows it and plain ``model.fit`` otherwise, and turns a NaN loss into :class:`LossNotFinite`.
``tlkeras.fitting.run`` (run directories, resume, reports), the sweep and source-task pre-training
(``tlkeras.fitting.pretrain``) all call it.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import progress
from tlkeras.fitting import distribute
from tlkeras.fitting.compiling import (
    compile_args,
    compile_model,
    phase_optimizer,
    set_trainable,
)
from tlkeras.fitting.config import FEATURE_EXTRACTION, PARTIAL, Phase
from tlkeras.fitting.fast_path import fit_frozen, forget_features
from tlkeras.fitting.frozen import fast_path_plan
from tlkeras.fitting.optimizers import CONSTANT, SwapEMAWeights

# The head's convergence rule on cached features (TrainConfig.converge_head).
CONVERGE_MAX_EPOCHS = 200
CONVERGE_PATIENCE = 20


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
        solver: how a head on cached features trained (``tlkeras.fitting.head_solver``): the L-BFGS
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
    epoch_seconds: list[float] = field(default_factory=list)


class EpochSeconds(keras.callbacks.Callback):
    """Wall seconds of each epoch (validation included), for ``metrics.json``'s phase record."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.seconds.append(round(time.perf_counter() - self._started, 3))


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
        plan = fast_path_plan(model, phase.fine_tune_at, augment_views=phase.augment_views)
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
    mix: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
    ordered_train: tf.data.Dataset | None = None,
) -> PhaseResult:
    """Train ``model`` through ``phase``: the one compile-and-fit of tlkeras.

    Args:
        model: a ``tlkeras.build_model`` model (its task comes from its ``predictions`` layer).
        phase: what trains, at which learning rate, for how long.
        train, validation: batched ``(image, label)`` datasets, labels encoded for the task.
        callbacks: passed to Keras (on the fast path they see the trained suffix; see
            ``tlkeras.fitting.fast_path.SaveFullModel``). A phase that converges (``Phase.converge``, on
            the fast path with validation) uses a copy of their ``EarlyStopping`` with the
            convergence patience, or adds one.
        label_smoothing, class_weight: for the loss.
        initial_epoch: epochs already run in earlier phases (the epoch numbers continue).
        train_bn: let BatchNorm layers of trainable blocks update their statistics.
        seed: seeds the fast path's sampling of cached views.
        title: how logs and errors name the phase (default ``phase.name``).
        run_dir: named in the message when a multi-worker peer is lost.
        verbose: Keras verbosity; non-zero also prints one line describing the phase.
        mix: maps the batched training dataset to a mixed one (MixUp/CutMix) when the phase trains
            end to end; the fast path trains on cached features without it (its note says so).
        ordered_train: ``train`` unshuffled (``ImageData.ordered("train")``, labels encoded). The
            fast path then caches from it (it reshuffles the cached rows itself) and keeps the
            pooled features in items order (``fast_path.pooled_features``).

    With ``phase.ema`` a ``tlkeras.fitting.optimizers.SwapEMAWeights`` goes first among the callbacks:
    validation, early stopping and checkpoints see the averaged weights, and the model ends
    holding them. A scheduled learning rate spans the phase's steps (``train``'s cardinality, or
    its batches counted once when unknown).

    Raises:
        LossNotFinite: the loss became NaN or infinite (names the epoch and learning rate).
    """
    forget_features(model)  # features cached by an earlier phase need not hold after this one
    set_trainable(model, phase.strategy, phase.fine_tune_at, train_bn=train_bn)
    scope = model.distribute_strategy
    fast, note = _fast_plan(model, phase)
    mode = note
    if mix is not None and fast:
        note = f"{note}; trained without mixing (the fast path caches features)"
    elif mix is not None:
        train = mix(train)
    epochs, callbacks = phase.epochs, list(callbacks)
    if fast and phase.converge and validation is not None:
        epochs, callbacks = _converging(phase, callbacks, "val_loss")
    if phase.ema:
        # First: every later callback (and validation) sees the averaged weights.
        callbacks.insert(0, SwapEMAWeights())
    timer = EpochSeconds()
    callbacks.append(timer)  # last: its epoch includes the others' epoch-end work
    steps = _steps_per_epoch(train) if phase.schedule != CONSTANT else None
    args = compile_args(
        model, phase, label_smoothing, steps_per_epoch=steps, epochs=epochs, scope=scope
    )
    refit_optimizer = None
    if fast and phase.refit:
        refit_optimizer = _refit_optimizer(model, phase, validation, steps, epochs)
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
        history = fit_frozen(
            model,
            train if ordered_train is None else ordered_train,
            validation,
            epochs=epochs,
            optimizer=args.optimizer,
            loss=args.loss,
            metrics=args.metrics,
            callbacks=callbacks,
            fine_tune_at=phase.fine_tune_at,
            augment_views=phase.augment_views,
            class_weight=class_weight,
            seed=seed,
            verbose=verbose,
            initial_epoch=initial_epoch,
            refit_optimizer=refit_optimizer,
            solver=phase.solver,
            keep_features=ordered_train is not None,
        )
    else:
        compile_model(model, args, scope=scope)
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
        fast_path=mode if fast else None,
        note=note,
        seconds=seconds,
        refit=getattr(history, "fast_path", {}).get("refit"),
        solver=getattr(history, "fast_path", {}).get("solver"),
        epoch_seconds=timer.seconds,
    )


def _refit_optimizer(
    model: keras.Model,
    phase: Phase,
    validation: tf.data.Dataset | None,
    steps: int | None,
    epochs: int,
) -> Callable[[], keras.optimizers.Optimizer]:
    """A factory of fresh optimizers for the fast path's refit, built in ``model``'s scope."""
    # The refit trains on train + validation: the same schedule per epoch, more steps.
    refit_steps = steps
    if phase.schedule != CONSTANT and validation is not None:
        refit_steps = steps + _steps_per_epoch(validation)
    return functools.partial(
        phase_optimizer, phase, model, refit_steps, epochs=epochs, scope=model.distribute_strategy
    )


def _steps_per_epoch(dataset: tf.data.Dataset) -> int:
    """Batches in one pass over ``dataset``: its cardinality, or counted once when unknown."""
    n = int(dataset.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "run_phase: expected a finite training dataset for a learning-rate schedule, received "
            "an infinite one"
        )
    if n < 0:  # unknown (a filter, say): one pass to count
        n = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
    return max(n, 1)


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
        with progress.step("epochs"):
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
