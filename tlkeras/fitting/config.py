"""What a run and a phase are: ``TrainConfig``, ``Phase`` and their argument checks.

A :class:`TrainConfig` holds the hyper-parameters of a run (validated on creation; the scripts read
its defaults); ``tlkeras.fitting.plan.plan_phases`` turns it into phases. A :class:`Phase` is a
strategy (which blocks train), a learning rate, an epoch budget and an optimizer
(``tlkeras.fitting.optimizers``: AdamW or SGD decaying kernels only, optionally with per-block
learning rates, a cosine schedule with warm-up and an EMA of the weights);
``tlkeras.fitting.runner.run_phase`` trains one. :func:`resolve_class_weight` turns
``TrainConfig.class_weight`` into the weights Keras applies to the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from tlkeras import checks
from tlkeras.fitting import frozen
from tlkeras.fitting.head_solver import GRADIENT, LBFGS, SOLVERS, check_solver
from tlkeras.fitting.optimizers import (
    ADAMW,
    AUTO_SCHEDULE,
    CONSTANT,
    COSINE,
    OPTIMIZERS,
    SCHEDULES,
    TRAIN_SCHEDULES,
    block_lr_multipliers,
    make_optimizer,
    phase_schedule,
)
from tlkeras.models.strategy import Strategy

# Phase plans hold strategies as their plain values: they are written to run_state.json.
SCRATCH, FEATURE_EXTRACTION = Strategy.SCRATCH.value, Strategy.FEATURE_EXTRACTION.value
PARTIAL, FULL = Strategy.PARTIAL.value, Strategy.FULL.value
HEAD_WARM_UP, FINE_TUNING = "head warm-up", "fine-tuning"
# TrainConfig's int fields and their minimums (checked first; a wrong type is a TypeError).
_INT_MINIMUMS = (
    ("epochs", 0),
    ("fine_tune_epochs", 0),
    ("batch_size", 1),
    ("early_stopping_patience", 0),
    ("seed", 0),
    ("augment_views", 0),
    ("warmup_epochs", 0),
    ("unfreeze_stages", 1),
)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TensorFlow's ops deterministic: a seeded run
    repeats itself on one machine. Without determinism, CPU thread scheduling under load changed
    the main job's fine-tuning from run to run (seed 0: best epoch 11, 24 or 27; test 97.2 to
    99.4 %); with it, two runs matched epoch for epoch at the same time per epoch (1.08 vs 1.09 s).
    Process-wide and never undone: TensorFlow has no switch back."""
    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


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
        seed: seeds Python, NumPy and TensorFlow and makes TensorFlow's ops deterministic
            (:func:`set_seed`): the same seed repeats a run on one machine.
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

    # metadata: each field's option as the scripts show it (tlkeras.cli.define_config_flags).
    epochs: int = field(
        default=10,
        metadata={
            "help": "Phase 1 epochs (head warm-up on the frozen backbone; the whole budget of "
            "scratch and feature_extraction)."
        },
    )
    fine_tune_epochs: int = field(
        default=10, metadata={"help": "Phase 2 epochs (partial/full); 0 skips it."}
    )
    # The scripts take "auto" too (tlkeras.train: the LR finder's suggestion): a string option.
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Phase 1 learning rate.", "flag": "string"}
    )
    fine_tune_learning_rate: float | None = field(
        default=None, metadata={"help": "Phase 2 learning rate (default: learning_rate / 10)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Batch size."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing of the cross-entropy loss."}
    )
    weight_decay: float = field(
        default=1e-4,
        metadata={
            "help": "Decoupled weight decay of the kernels (biases and normalisation "
            "parameters excluded)."
        },
    )
    class_weight: str | dict | None = field(
        default=None,
        metadata={"help": "auto (balanced) | none | INDEX:WEIGHT,... e.g. 0:1.0,1:3.5."},
    )
    early_stopping_patience: int = field(
        default=3,
        metadata={
            "help": "Epochs without a better validation loss before a phase stops; 0 disables "
            "early stopping."
        },
    )
    reduce_lr_on_plateau: bool = field(
        default=False,
        metadata={"help": "Halve the learning rate when validation loss stalls."},
    )
    fast: bool = field(
        default=True, metadata={"help": "Train the frozen phase on cached backbone features."}
    )
    augment_views: int = field(
        default=frozen.DEFAULT_AUGMENT_VIEWS,
        metadata={
            "help": "Augmented views per image cached on the fast path (plus the clean one); "
            "0: clean only.",
            "lower_bound": 0,
        },
    )
    converge_head: bool = field(
        default=True,
        metadata={
            "help": "On cached features, train the head until validation loss stops improving "
            "(not --epochs)."
        },
    )
    refit: bool = field(
        default=True,
        metadata={
            "help": "feature_extraction on cached features: retrain the head on train + "
            "validation at the end."
        },
    )
    head_solver: str = field(
        default=LBFGS,
        metadata={
            "help": "feature_extraction head on cached features: lbfgs solves a linear head to "
            "convergence (L2 strength chosen on validation); gradient trains it by epochs.",
            "choices": SOLVERS,
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seeds Python, NumPy, TensorFlow and the data split, with deterministic "
            "TensorFlow ops: the same seed repeats a run on one machine."
        },
    )
    optimizer: str = field(
        default=ADAMW,
        metadata={"help": "Optimizer of every phase (decoupled decay).", "choices": OPTIMIZERS},
    )
    layer_decay: float = field(
        default=1.0,
        metadata={
            "help": "Fine-tuning: learning-rate multiplier per block from the head down (last "
            "block x decay, the one before x decay^2, ...); 1 is off."
        },
    )
    schedule: str = field(
        default=AUTO_SCHEDULE,
        metadata={
            "help": "Learning-rate schedule of each phase: auto (cosine after one warm-up epoch "
            "for fine-tuning of 2+ epochs without --reduce_lr_on_plateau, constant otherwise), "
            "constant, or cosine decay over the phase's budget.",
            "choices": TRAIN_SCHEDULES,
        },
    )
    warmup_epochs: int = field(
        default=0,
        metadata={"help": "Linear warm-up epochs at each cosine phase's start (auto: 0 means 1)."},
    )
    ema: bool = field(
        default=False,
        metadata={
            "help": "Fine-tuning: keep an exponential moving average of the weights; validate, "
            "checkpoint and export the averaged weights."
        },
    )
    ema_momentum: float = field(
        default=0.99, metadata={"help": "EMA momentum per step (with --ema)."}
    )
    unfreeze_stages: int = field(
        default=1,
        metadata={
            "help": "Fine-tuning unfreezes the trainable blocks from the top in this many "
            "stages (gradual unfreezing, one recompile each); 1: all at once."
        },
    )

    def __post_init__(self) -> None:
        for name, minimum in _INT_MINIMUMS:
            value = getattr(self, name)
            checks.integer(f"TrainConfig.{name}", value, minimum, wrong_type=TypeError)
        if self.epochs + self.fine_tune_epochs == 0:
            raise ValueError(
                "TrainConfig: expected epochs + fine_tune_epochs >= 1, received 0 and 0"
            )
        checks.number(
            "TrainConfig.learning_rate",
            self.learning_rate,
            low=0.0,
            low_open=True,
            finite=True,
            wrong_type=TypeError,
        )
        if self.fine_tune_learning_rate is not None:
            checks.number(
                "TrainConfig.fine_tune_learning_rate",
                self.fine_tune_learning_rate,
                low=0.0,
                low_open=True,
                finite=True,
                wrong_type=TypeError,
            )
        checks.number(
            "TrainConfig.label_smoothing",
            self.label_smoothing,
            low=0.0,
            high=1.0,
            finite=True,
            wrong_type=TypeError,
        )
        checks.number(
            "TrainConfig.weight_decay",
            self.weight_decay,
            low=0.0,
            finite=True,
            wrong_type=TypeError,
        )
        _check_class_weight(self.class_weight)
        check_solver(self.head_solver, "TrainConfig.head_solver")
        for name in ("reduce_lr_on_plateau", "fast", "converge_head", "refit", "ema"):
            checks.boolean(f"TrainConfig.{name}", getattr(self, name), wrong_type=TypeError)
        checks.choice("TrainConfig.optimizer", self.optimizer, OPTIMIZERS)
        checks.interval("TrainConfig.layer_decay", self.layer_decay, 0, 1, low_open=True)
        checks.choice("TrainConfig.schedule", self.schedule, TRAIN_SCHEDULES)
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
        checks.number(
            "TrainConfig.ema_momentum",
            self.ema_momentum,
            low=0.0,
            high=1.0,
            low_open=True,
            finite=True,
            wrong_type=TypeError,
        )
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


def _check_class_weight(cw: Any) -> None:
    if isinstance(cw, str):
        if cw != "auto":
            raise ValueError(
                f"TrainConfig.class_weight: expected 'auto', a dict or None, received {cw!r}"
            )
    elif isinstance(cw, Mapping):
        for k, v in cw.items():
            if not checks.is_int(k) or k < 0:
                raise ValueError(
                    "TrainConfig.class_weight: expected non-negative int class indices as "
                    f"keys, received {k!r}"
                )
            checks.number(
                f"TrainConfig.class_weight[{k}]",
                v,
                low=0.0,
                low_open=True,
                finite=True,
                wrong_type=TypeError,
            )
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
            (``tlkeras.fitting.frozen.fast_path_plan``); never under ``tf.distribute``.
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
    augment_views: int = frozen.DEFAULT_AUGMENT_VIEWS
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
            checks.boolean(f"Phase.{name}", getattr(self, name), wrong_type=TypeError)
        checks.choice("Phase.optimizer_name", self.optimizer_name, OPTIMIZERS)
        checks.choice("Phase.schedule", self.schedule, SCHEDULES)
        checks.interval("Phase.layer_decay", self.layer_decay, 0, 1, low_open=True)
        object.__setattr__(self, "layer_decay", float(self.layer_decay))
        checks.interval(
            "Phase.ema_momentum", self.ema_momentum, 0, 1, low_open=True, high_open=True
        )
        if self.ema and self.solver == LBFGS:
            raise ValueError(
                "Phase.ema: expected False with solver='lbfgs' (a solved head takes no steps to "
                "average), received True"
            )
        checks.integer("Phase.augment_views", self.augment_views, 0, wrong_type=TypeError)
        if self.fine_tune_at is not None and self.strategy != PARTIAL:
            raise ValueError(
                f"Phase.fine_tune_at: expected None unless strategy='partial', received "
                f"{self.fine_tune_at} with strategy={self.strategy!r}"
            )
        checks.integer("Phase.epochs", self.epochs, 1, wrong_type=TypeError)
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            checks.number(
                f"Phase.{name}", value, low=0, low_open=name == "learning_rate", finite=True
            )
            object.__setattr__(self, name, float(value))
        checks.integer("Phase.warmup_epochs", self.warmup_epochs, wrong_type=TypeError)
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
            if not checks.is_int(steps_per_epoch) or steps_per_epoch < 1:
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
