"""The one compile step of tlkeras: which blocks train, and what a model is compiled with.

:func:`set_trainable` applies a phase's strategy (with the BatchNorm rules of
``tlkeras.models.strategy``); :func:`compile_args` builds a phase's optimizer
(``tlkeras.fitting.config.Phase.optimizer``: its family, per-block learning rates, schedule, weight
average and loss scaling) with the task's loss and metrics; :func:`compile_model` is the one
``model.compile`` of tlkeras. The runner (``tlkeras.fitting.runner.run_phase``), the fast path
(``tlkeras.fitting.fast_path.fit_frozen``: the trained suffix, the solved head, the refit) and the
LR finder (``tlkeras.fitting.lr_finder``) all set up and compile through these, so they cannot
drift apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from tlkeras.fitting.config import SCRATCH, Phase
from tlkeras.models.strategy import apply_strategy, scratch_batchnorm
from tlkeras.models.task import infer, loss_for, metrics_for


@dataclass(frozen=True)
class CompileArgs:
    """What :func:`compile_model` compiles a model with.

    Attributes:
        optimizer: a fresh ``keras.optimizers.Optimizer`` (a phase never inherits moments).
        loss: the task's loss.
        metrics: the task's metrics; ``None`` compiles none (the LR finder reads the loss only).
    """

    optimizer: Any
    loss: Any
    metrics: list[Any] | None = None


def set_trainable(
    model: keras.Model, strategy: str, fine_tune_at: int | None, *, train_bn: bool = False
) -> None:
    """Set which blocks of ``model`` train for ``strategy`` (``tlkeras.apply_strategy``), and for
    ``scratch`` its BatchNorm rule (``tlkeras.models.strategy.scratch_batchnorm``)."""
    apply_strategy(model, strategy, fine_tune_at, train_bn=train_bn)
    if strategy == SCRATCH:
        scratch_batchnorm(model)


def phase_optimizer(
    phase: Phase,
    model: keras.Model,
    steps_per_epoch: int | None = None,
    *,
    epochs: int | None = None,
    scope: tf.distribute.Strategy | None = None,
) -> keras.optimizers.Optimizer:
    """``phase.optimizer(model, steps_per_epoch, epochs=epochs)``, built in ``scope`` when given
    (its variables then live on every replica)."""
    with _within(scope):
        return phase.optimizer(model, steps_per_epoch, epochs=epochs)


def compile_args(
    model: keras.Model,
    phase: Phase,
    label_smoothing: float = 0.0,
    *,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    metrics: bool = True,
    scope: tf.distribute.Strategy | None = None,
) -> CompileArgs:
    """The optimizer, loss and metrics ``phase`` trains ``model`` with.

    Args:
        model: a ``tlkeras.build_model`` model (its task comes from its ``predictions`` layer; its
            blocks give per-block learning rates; float16 compute gets a loss-scaled optimizer).
        phase: gives the optimizer (``Phase.optimizer``).
        label_smoothing: for the cross-entropy loss.
        steps_per_epoch, epochs: what a learning-rate schedule spans.
        metrics: build the task's metrics (``False``: ``CompileArgs.metrics`` is ``None``).
        scope: the ``tf.distribute`` strategy the optimizer and metric variables are built in.
    """
    task, from_logits = infer(model)
    loss = loss_for(task, from_logits=from_logits, label_smoothing=label_smoothing)
    with _within(scope):  # optimizer and metric variables live on every replica
        optimizer = phase.optimizer(model, steps_per_epoch, epochs=epochs)
        built = metrics_for(task, from_logits=from_logits) if metrics else None
    return CompileArgs(optimizer=optimizer, loss=loss, metrics=built)


def compile_model(
    model: keras.Model, args: CompileArgs, *, scope: tf.distribute.Strategy | None = None
) -> None:
    """Compile ``model`` with ``args`` (in ``scope`` when given): the one ``model.compile``."""
    with _within(scope):
        metrics = None if args.metrics is None else list(args.metrics)
        model.compile(optimizer=args.optimizer, loss=args.loss, metrics=metrics)


def _within(scope: tf.distribute.Strategy | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if scope is None else scope.scope()
