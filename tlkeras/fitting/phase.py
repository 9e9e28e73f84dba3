"""Phases: what one training phase is, how a run's phases are planned, and the one runner.

A :class:`Phase` is a strategy (which blocks train), a learning rate, an epoch budget and an
optimizer (``tlkeras.fitting.optimizers``: AdamW or SGD decaying kernels only, optionally with per-block
learning rates, a cosine schedule with warm-up and an EMA of the weights). :func:`plan_phases`
turns a :class:`TrainConfig` into the recipe of the Keras transfer-learning guide: a head warm-up on
the frozen backbone, then (for ``partial``/``full``) fine-tuning at a smaller learning rate,
optionally unfreezing the backbone top-down in stages (ULMFiT's gradual unfreezing); ``scratch`` is
one phase.

:func:`run_phase` is the only place in tlkeras that compiles and fits a model: it applies the
phase's strategy (and the BatchNorm rules of ``tlkeras.models.strategy``), builds loss, metrics and
optimizer from the model's task, trains on the fast frozen path (``tlkeras.fitting.features.fit_frozen``)
when the phase allows it and plain ``model.fit`` otherwise, and turns a NaN loss into
:class:`LossNotFinite`. ``tlkeras.workflows.training.fit`` (run directories, resume, reports), the sweep and
source-task pre-training (``tlkeras.models.weights``) all call it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras.fitting import distribute, features
from tlkeras.fitting.head_solver import GRADIENT, LBFGS, check_solver
from tlkeras.fitting.optimizers import (
    ADAMW,
    AUTO_SCHEDULE,
    CONSTANT,
    COSINE,
    OPTIMIZERS,
    SCHEDULES,
    TRAIN_SCHEDULES,
    SwapEMAWeights,
    block_lr_multipliers,
    check_choice,
    make_optimizer,
    phase_schedule,
)
from tlkeras.models.strategy import Strategy, apply_strategy, scratch_batchnorm
from tlkeras.models.task import infer, loss_for, metrics_for

# Phase plans hold strategies as their plain values: they are written to run_state.json.
SCRATCH, FEATURE_EXTRACTION = Strategy.SCRATCH.value, Strategy.FEATURE_EXTRACTION.value
PARTIAL, FULL = Strategy.PARTIAL.value, Strategy.FULL.value
HEAD_WARM_UP, FINE_TUNING = "head warm-up", "fine-tuning"
# schedule="auto" (the default): fine-tuning of two epochs or more decays by a cosine after this
# many warm-up epochs; the head warm-up and scratch keep a constant rate. Measured on CIFAR-10
# (96 px, 6,000 training images, full, 5 epochs at 1e-4, validation accuracy from the solved
# head's 0.69): constant 0.72, cosine after one warm-up epoch 0.74 (flips only, as thumbnails get);
# on photos the recipe ablation found it neutral (ants/bees +1.4, cats/dogs -0.2 points, within the
# seed spread: BENCHMARKS.md recipe_*).
AUTO_WARMUP_EPOCHS = 1
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
        learning_rate: learning rate of phase 1.
        fine_tune_learning_rate: phase 2 learning rate; ``None`` means ``learning_rate / 10``.
        batch_size: examples per batch and replica (``tlkeras.train`` batches the data by
            ``batch_size`` × replicas under a ``tf.distribute`` strategy).
        label_smoothing: for the cross-entropy losses, in ``[0, 1)``.
        weight_decay: decoupled weight decay (biases and normalisation parameters excluded).
        class_weight: ``"auto"`` (balanced from the training counts), a ``{class_index: weight}``
            dict, or ``None``.
        early_stopping_patience: epochs without validation-loss improvement before stopping
            (per phase); 0 disables early stopping.
        reduce_lr_on_plateau: halve the learning rate after ``max(1, patience // 2)`` flat epochs
            (not with ``schedule="cosine"``: a schedule owns the learning rate).
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
            chosen by validation log loss; ``tlkeras.fitting.head_solver``), ``epochs``,
            ``converge_head`` and the learning rate do not apply to it; heads it cannot solve
            (hidden layers, multi-label, label smoothing) train by ``"gradient"`` epochs, and the
            run says why.
        seed: seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``).
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov momentum 0.9), every phase
            (``tlkeras.fitting.optimizers.OPTIMIZERS``).
        layer_decay: per-block learning rates in fine-tuning (timm's layer decay): the head at the
            learning rate, the backbone's last block at ``layer_decay`` times it, the one before
            at ``layer_decay**2``… In ``(0, 1]``; 1 trains every block at the same rate. The head
            warm-up and ``scratch`` do not use it.
        schedule: ``"auto"`` (cosine after ``AUTO_WARMUP_EPOCHS`` of warm-up for fine-tuning
            phases of two epochs or more without ``reduce_lr_on_plateau``, constant otherwise),
            ``"constant"`` or ``"cosine"`` (cosine decay to 0 over each phase, after
            ``warmup_epochs`` of linear warm-up; ``tlkeras.fitting.optimizers.TRAIN_SCHEDULES``).
        warmup_epochs: epochs of linear learning-rate warm-up at the start of each cosine phase;
            fewer than each such phase's epochs (``"auto"``: 0 means ``AUTO_WARMUP_EPOCHS``).
        ema: fine-tune with an exponential moving average of the weights: validation, early
            stopping, checkpoints and the final model use the averaged weights.
        ema_momentum: the average's momentum, in ``(0, 1)``.
        unfreeze_stages: fine-tune in this many stages (ULMFiT's gradual unfreezing), each
            unfreezing the next group of blocks top-down until the strategy's own first trainable
            block; ``fine_tune_epochs`` is split among them. 1: one fine-tuning phase.
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
    optimizer: str = ADAMW
    layer_decay: float = 1.0
    schedule: str = AUTO_SCHEDULE
    warmup_epochs: int = 0
    ema: bool = False
    ema_momentum: float = 0.99
    unfreeze_stages: int = 1

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
        for name in ("reduce_lr_on_plateau", "fast", "converge_head", "refit", "ema"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"TrainConfig.{name}: expected a bool, received {getattr(self, name)!r}"
                )
        check_choice(self.optimizer, OPTIMIZERS, "TrainConfig.optimizer")
        _check_layer_decay("TrainConfig.layer_decay", self.layer_decay)
        check_choice(self.schedule, TRAIN_SCHEDULES, "TrainConfig.schedule")
        _check_int("warmup_epochs", self.warmup_epochs, 0)
        if self.warmup_epochs and self.schedule == CONSTANT:
            raise ValueError(
                f"TrainConfig.warmup_epochs: expected 0 with schedule='constant' (warm-up is part "
                f"of the cosine schedule), received {self.warmup_epochs}"
            )
        if self.reduce_lr_on_plateau and self.schedule == COSINE:
            raise ValueError(
                f"TrainConfig.reduce_lr_on_plateau: expected False with schedule="
                f"{self.schedule!r} (ReduceLROnPlateau cannot change a scheduled learning rate), "
                "received True"
            )
        _check_float("ema_momentum", self.ema_momentum, low=0.0, high=1.0, low_open=True)
        _check_int("unfreeze_stages", self.unfreeze_stages, 1)
        if self.fine_tune_epochs and self.unfreeze_stages > self.fine_tune_epochs:
            raise ValueError(
                f"TrainConfig.unfreeze_stages: expected at most fine_tune_epochs="
                f"{self.fine_tune_epochs} (each stage trains >= 1 epoch), received "
                f"{self.unfreeze_stages}"
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


def _check_layer_decay(what: str, value: Any) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{what}: expected a number in (0, 1], received {value!r}")


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
        learning_rate, weight_decay: of the phase's optimizer (kernels decay; biases and BN do
            not).
        epochs: the phase's epoch budget (early stopping may end it sooner).
        fast: train on cached features of the frozen prefix when that is valid
            (``tlkeras.fitting.features.fast_path_plan``); never under ``tf.distribute``.
        converge: on the fast path with validation data, train until the validation loss has not
            improved for ``CONVERGE_PATIENCE`` epochs, at most ``max(epochs,
            CONVERGE_MAX_EPOCHS)`` (an ``EarlyStopping`` among the callbacks gets that patience).
        refit: on the fast path with validation data, then retrain what trains from its initial
            weights on train + validation for the best epoch count.
        augment_views: augmented views per training image on the fast path
            (``TrainConfig.augment_views``).
        solver: ``"lbfgs"`` solves a linear head on cached features of the whole frozen
            backbone to convergence (``tlkeras.fitting.head_solver``); ``"gradient"`` trains by epochs.
        optimizer_name: ``"adamw"`` or ``"sgd"`` (``tlkeras.fitting.optimizers.make_optimizer``).
        layer_decay: per-block learning-rate decay (``tlkeras.fitting.optimizers.block_lr_multipliers``);
            1.0: none.
        schedule, warmup_epochs: the learning rate over the phase (``"constant"``, or
            ``"cosine"`` after ``warmup_epochs`` of linear warm-up; fewer than ``epochs``).
        ema, ema_momentum: train with an exponential moving average of the weights, which
            validation, callbacks and the final model see (``tlkeras.fitting.optimizers.SwapEMAWeights``).
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
    optimizer_name: str = ADAMW
    layer_decay: float = 1.0
    schedule: str = CONSTANT
    warmup_epochs: int = 0
    ema: bool = False
    ema_momentum: float = 0.99

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy.parse(self.strategy).value)
        check_solver(self.solver, "Phase.solver")
        for name in ("fast", "converge", "refit", "ema"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Phase.{name}: expected a bool, received {getattr(self, name)!r}")
        check_choice(self.optimizer_name, OPTIMIZERS, "Phase.optimizer_name")
        check_choice(self.schedule, SCHEDULES, "Phase.schedule")
        _check_layer_decay("Phase.layer_decay", self.layer_decay)
        object.__setattr__(self, "layer_decay", float(self.layer_decay))
        ok = isinstance(self.ema_momentum, (int, float, np.floating)) and 0 < self.ema_momentum < 1
        if isinstance(self.ema_momentum, bool) or not ok:
            raise ValueError(
                f"Phase.ema_momentum: expected a number in (0, 1), received {self.ema_momentum!r}"
            )
        if self.ema and self.solver == LBFGS:
            raise ValueError(
                "Phase.ema: expected False with solver='lbfgs' (a solved head takes no steps to "
                "average), received True"
            )
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
        if isinstance(self.warmup_epochs, bool) or not isinstance(
            self.warmup_epochs, (int, np.integer)
        ):
            raise TypeError(
                f"Phase.warmup_epochs: expected an int, received {self.warmup_epochs!r}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"Phase.warmup_epochs: expected an int >= 0 and < epochs={self.epochs}, received "
                f"{self.warmup_epochs}"
            )
        if self.warmup_epochs and self.schedule == CONSTANT:
            raise ValueError(
                f"Phase.warmup_epochs: expected 0 with schedule='constant', received "
                f"{self.warmup_epochs}"
            )

    def describe(self) -> str:
        out = (
            f"strategy={self.strategy} fine_tune_at={self.fine_tune_at} "
            f"learning_rate={self.learning_rate:g}"
        )
        # Only what differs from the plain recipe: log lines stay as they were otherwise.
        if self.optimizer_name != ADAMW:
            out += f" optimizer={self.optimizer_name}"
        if self.layer_decay != 1.0:
            out += f" layer_decay={self.layer_decay:g}"
        if self.schedule != CONSTANT:
            out += f" schedule={self.schedule} warmup_epochs={self.warmup_epochs}"
        if self.ema:
            out += f" ema_momentum={self.ema_momentum:g}"
        return out

    def optimizer(
        self,
        model: keras.Model | None = None,
        steps_per_epoch: int | None = None,
        *,
        epochs: int | None = None,
    ) -> keras.optimizers.Optimizer:
        """A fresh optimizer for this phase (a new phase never inherits moments from the last).

        Args:
            model: the tlkeras model, needed for per-block learning rates (``layer_decay < 1``);
                a model computing in float16 gets a ``LossScaleOptimizer`` around the optimizer.
            steps_per_epoch: optimizer steps per epoch, needed by a schedule.
            epochs: the epochs a schedule spans (default ``self.epochs``).
        """
        multipliers = None
        if self.layer_decay < 1.0:
            if model is None:
                raise ValueError(
                    f"Phase.optimizer: expected the model (layer_decay={self.layer_decay:g} needs "
                    "its blocks), received None"
                )
            multipliers = block_lr_multipliers(model, self.layer_decay)
        learning_rate: Any = self.learning_rate
        if self.schedule != CONSTANT:
            if (
                isinstance(steps_per_epoch, bool)
                or not isinstance(steps_per_epoch, (int, np.integer))
                or steps_per_epoch < 1
            ):
                raise ValueError(
                    f"Phase.optimizer: expected steps_per_epoch >= 1 for schedule="
                    f"{self.schedule!r}, received {steps_per_epoch!r}"
                )
            epochs = self.epochs if epochs is None else max(int(epochs), self.epochs)
            learning_rate = phase_schedule(
                self.learning_rate,
                schedule=self.schedule,
                total_steps=int(epochs * steps_per_epoch),
                warmup_steps=int(self.warmup_epochs * steps_per_epoch),
            )
        optimizer = make_optimizer(
            self.optimizer_name,
            learning_rate,
            self.weight_decay,
            lr_multipliers=multipliers,
            ema=self.ema,
            ema_momentum=self.ema_momentum,
        )
        if model is not None and computes_in_float16(model):
            # float16 gradients underflow: scale the loss. Keras's compile does so only for a
            # model whose own policy is mixed_float16; the fast path's suffix and the LR finder's
            # copy are not built under it, so it is done here for every phase's model.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer


def computes_in_float16(model: keras.Model) -> bool:
    """Whether a layer of ``model`` runs under ``mixed_float16`` (``build_model(dtype_policy=)``)."""
    return any(
        getattr(layer.dtype_policy, "name", None) == "mixed_float16"
        for layer in model._flatten_layers(include_self=True)
    )


def plan_phases(
    strategy: str,
    fine_tune_at: int | None,
    config: TrainConfig,
    num_blocks: int | None = None,
) -> list[Phase]:
    """The phases of a ``strategy`` run under ``config`` (the two-phase recipe).

    ``scratch``: one phase of ``epochs + fine_tune_epochs`` at ``learning_rate``. Otherwise a head
    warm-up of ``epochs`` on the frozen backbone, then for ``partial``/``full`` fine-tuning for
    ``fine_tune_epochs`` at the fine-tuning learning rate. With ``config.fast`` the warm-up and
    ``partial`` fine-tuning train on cached features of what stays frozen.

    With ``config.unfreeze_stages = S > 1`` fine-tuning is S phases (``"fine-tuning 1/S"``…): the
    blocks from the strategy's first trainable block to the last are split into S contiguous
    groups, and stage s trains the top s groups (a ``partial`` phase at the group's first block);
    the last stage is the strategy's own. ``fine_tune_epochs`` is split evenly, the remainder to
    the last stage. ``num_blocks`` (the backbone's block count, ``len(tlkeras.blocks(model))``)
    is needed only then.

    Raises:
        ValueError: a phase would have no epoch, ``warmup_epochs`` not fewer than a phase's
            epochs, or more stages than epochs or than blocks to unfreeze.
    """
    strategy = Strategy.parse(strategy).value
    decay = float(config.weight_decay)
    common = {"optimizer_name": config.optimizer}
    if strategy == SCRATCH:
        total = config.epochs + config.fine_tune_epochs
        common.update(_schedule(config, SCRATCH, total, fine_tuning=False))
        return [Phase(SCRATCH, SCRATCH, None, config.learning_rate, total, decay, **common)]
    phases = []
    if config.epochs > 0:
        common.update(_schedule(config, HEAD_WARM_UP, config.epochs, fine_tuning=False))
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
                **common,
            )
        )
    if strategy in (PARTIAL, FULL) and config.fine_tune_epochs > 0:
        lr = config.resolved_fine_tune_learning_rate
        for name, stage_strategy, at, epochs in _fine_tuning_stages(
            strategy, fine_tune_at, config, num_blocks
        ):
            common.update(_schedule(config, name, epochs, fine_tuning=True))
            phases.append(
                Phase(
                    name,
                    stage_strategy,
                    at,
                    lr,
                    epochs,
                    decay,
                    fast=config.fast and stage_strategy == PARTIAL,  # `full`: no frozen prefix
                    augment_views=config.augment_views,
                    layer_decay=config.layer_decay,
                    ema=config.ema,
                    ema_momentum=config.ema_momentum,
                    **common,
                )
            )
    if not phases:
        raise ValueError(
            f"strategy={strategy!r}: expected epochs >= 1 (it has no fine-tuning phase), received "
            f"epochs={config.epochs}"
        )
    return phases


def _schedule(config: TrainConfig, name: str, epochs: int, *, fine_tuning: bool) -> dict[str, Any]:
    """The ``schedule`` and ``warmup_epochs`` of phase ``name`` (``TrainConfig.schedule``)."""
    schedule, warmup = config.schedule, config.warmup_epochs
    if schedule == AUTO_SCHEDULE:
        cosine = fine_tuning and epochs >= 2 and not config.reduce_lr_on_plateau
        schedule = COSINE if cosine else CONSTANT
        warmup = min(warmup or AUTO_WARMUP_EPOCHS, epochs - 1) if cosine else 0
    if warmup >= epochs:
        raise ValueError(
            f"TrainConfig.warmup_epochs: expected fewer than the {epochs} epochs of phase "
            f"{name!r}, received {config.warmup_epochs}"
        )
    return {"schedule": schedule, "warmup_epochs": warmup}


def _fine_tuning_stages(
    strategy: str, fine_tune_at: int | None, config: TrainConfig, num_blocks: int | None
) -> list[tuple[str, str, int | None, int]]:
    """``(name, strategy, fine_tune_at, epochs)`` of each fine-tuning stage, top-down."""
    stages, total = config.unfreeze_stages, config.fine_tune_epochs
    if stages == 1:
        return [(FINE_TUNING, strategy, fine_tune_at, total)]
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)):
        raise ValueError(
            f"plan_phases: expected num_blocks (the backbone's block count) with "
            f"unfreeze_stages={stages}, received {num_blocks!r}"
        )
    first = 0  # (stages <= total: TrainConfig refuses more stages than fine-tuning epochs)
    if strategy == PARTIAL:
        if fine_tune_at is None or not (-(num_blocks - 1) <= fine_tune_at <= num_blocks - 1):
            raise ValueError(
                f"fine_tune_at: expected 1..{num_blocks - 1} or -{num_blocks - 1}..-1 for a "
                f"backbone of {num_blocks} blocks, received {fine_tune_at!r}"
            )
        first = int(fine_tune_at) % num_blocks
    span = num_blocks - first
    if stages > span:
        raise ValueError(
            f"TrainConfig.unfreeze_stages: expected at most the {span} blocks to unfreeze "
            f"(blocks {first}..{num_blocks - 1}), received {stages}"
        )
    # The first block of each contiguous group, bottom-up (the lower groups take the remainder).
    starts = [int(group[0]) for group in np.array_split(np.arange(first, num_blocks), stages)]
    per_stage = total // stages
    out = []
    for s in range(1, stages + 1):
        epochs = per_stage + (total - per_stage * stages if s == stages else 0)
        name = f"{FINE_TUNING} {s}/{stages}"
        if s == stages:  # exactly the strategy's own phase
            out.append((name, strategy, fine_tune_at, epochs))
        else:
            out.append((name, PARTIAL, starts[stages - s], epochs))
    return out


def resolve_class_weight(config: TrainConfig, data: Any, task: str) -> dict[int, float] | None:
    """``config.class_weight`` as Keras weighs the loss: ``"auto"`` balanced on ``data``'s training
    counts, a dict checked against ``data``'s classes; ``None`` for none."""
    if config.class_weight is None:
        return None
    if task == "multilabel":
        raise ValueError(
            "class_weight: expected None for a multilabel head (Keras weights whole examples by "
            f"one class), received {config.class_weight!r}"
        )
    if config.class_weight == "auto":
        return {int(k): float(v) for k, v in data.class_weight().items()}
    n = len(data.class_names)
    bad = [k for k in config.class_weight if int(k) >= n]
    if bad:
        raise ValueError(
            f"class_weight: expected class indices in [0, {n - 1}], received {sorted(bad)}"
        )
    return {int(k): float(v) for k, v in config.class_weight.items()}


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
    mix: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
) -> PhaseResult:
    """Train ``model`` through ``phase``: the one compile-and-fit of tlkeras.

    Args:
        model: a ``tlkeras.build_model`` model (its task comes from its ``predictions`` layer).
        phase: what trains, at which learning rate, for how long.
        train, validation: batched ``(image, label)`` datasets, labels encoded for the task.
        callbacks: passed to Keras (on the fast path they see the trained suffix; see
            ``tlkeras.fitting.features.SaveFullModel``). A phase that converges (``Phase.converge``, on
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

    With ``phase.ema`` a ``tlkeras.fitting.optimizers.SwapEMAWeights`` goes first among the callbacks:
    validation, early stopping and checkpoints see the averaged weights, and the model ends
    holding them. A scheduled learning rate spans the phase's steps (``train``'s cardinality, or
    its batches counted once when unknown).

    Raises:
        LossNotFinite: the loss became NaN or infinite (names the epoch and learning rate).
    """
    apply_strategy(model, phase.strategy, phase.fine_tune_at, train_bn=train_bn)
    if phase.strategy == SCRATCH:
        scratch_batchnorm(model)
    task, from_logits = infer(model)
    scope = model.distribute_strategy
    loss = loss_for(task, from_logits=from_logits, label_smoothing=label_smoothing)
    fast, note = _fast_plan(model, phase)
    mode = note
    if mix is not None:
        if fast:
            note = f"{note}; trained without mixing (the fast path caches features)"
        else:
            train = mix(train)
    epochs, callbacks = phase.epochs, list(callbacks)
    if fast and phase.converge and validation is not None:
        epochs, callbacks = _converging(phase, callbacks, "val_loss")
    if phase.ema:
        # First: every later callback (and validation) sees the averaged weights.
        callbacks.insert(0, SwapEMAWeights())
    scheduled = phase.schedule != CONSTANT
    steps = _steps_per_epoch(train) if scheduled else None
    with scope.scope():  # optimizer and metric variables live on every replica
        optimizer = phase.optimizer(model, steps, epochs=epochs)
        metrics = metrics_for(task, from_logits=from_logits)
    refit_optimizer = None
    if fast and phase.refit:
        # The refit trains on train + validation: the same schedule per epoch, more steps.
        refit_steps = steps
        if scheduled and validation is not None:
            refit_steps = steps + _steps_per_epoch(validation)
        refit_optimizer = functools.partial(
            _in_scope, scope, phase.optimizer, model, refit_steps, epochs=epochs
        )
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
            refit_optimizer=refit_optimizer,
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
        fast_path=mode if fast else None,
        note=note,
        seconds=seconds,
        refit=getattr(history, "fast_path", {}).get("refit"),
        solver=getattr(history, "fast_path", {}).get("solver"),
    )


def _in_scope(scope: tf.distribute.Strategy, make: Callable[..., Any], *args, **kwargs) -> Any:
    with scope.scope():
        return make(*args, **kwargs)


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
