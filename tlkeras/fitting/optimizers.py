"""Optimizers of the fine-tuning recipe: per-block learning rates, schedules and weight EMA.

Per-block learning rates (timm's layer decay, fastai's discriminative learning rates): the head
trains at the phase's learning rate, the backbone's last block at ``decay`` times it, the block
before at ``decay**2``… down to the stem. :func:`block_lr_multipliers` computes the table from the
model's blocks (``tlkeras.models.blocks``), keyed by ``variable.path``.

Keras 3 has no parameter groups, and scaling a gradient does not change an Adam step (Adam divides
by the gradient's own scale), so the multiplier is applied inside the optimizer's per-variable
update: :class:`AdamW` and :class:`SGD` here are Keras's with a ``lr_multipliers`` table that scales
the learning rate of each variable's update step and of its decoupled weight decay. They serialize
(``get_config``, registered under ``tlkeras>``), take Keras's EMA arguments and work inside a
``keras.optimizers.LossScaleOptimizer`` (``mixed_float16`` wraps them automatically).

:func:`make_optimizer` builds one by name (``OPTIMIZERS``); :func:`phase_schedule` builds a phase's
learning rate (``SCHEDULES``: constant, or cosine decay with a linear warm-up);
:class:`SwapEMAWeights` is Keras's callback of that name, made to leave the EMA weights in the
model however a fit ends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from tlkeras import checks
from tlkeras.models.blocks import blocks, get_backbone_model

logger = logging.getLogger(__name__)

ADAMW, SGD_NAME = "adamw", "sgd"
OPTIMIZERS = (ADAMW, SGD_NAME)
CONSTANT, COSINE, AUTO_SCHEDULE = "constant", "cosine", "auto"
SCHEDULES = (CONSTANT, COSINE)
# What a TrainConfig may say: "auto" is cosine with warm-up for fine-tuning phases of two epochs or
# more (not with ReduceLROnPlateau), constant otherwise (tlkeras.fitting.plan.plan_phases).
TRAIN_SCHEDULES = (AUTO_SCHEDULE, CONSTANT, COSINE)
SGD_MOMENTUM = 0.9
# Decay only kernels: decaying biases and BN scale/offset hurts and is not what L2 intends.
NO_DECAY = ("bias", "gamma", "beta")


def _trainable_kind(model: keras.Model) -> list:
    """Every variable of ``model`` that trains when its layer does, frozen or not right now.

    A variable's ``trainable`` flag follows its layer's (frozen blocks report none), so this reads
    each layer's own list of trainable-kind variables instead (BN moving statistics are not in it).
    """
    seen, out = set(), []
    for layer in model._flatten_layers(include_self=True):
        for variable in layer._trainable_variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                out.append(variable)
    return out


def block_lr_multipliers(
    model: keras.Model, decay: float, backbone: str | None = None
) -> dict[str, float]:
    """Learning-rate multipliers by ``variable.path``: 1 for the head, ``decay**(n - i)`` for block i.

    ``n`` is the number of blocks of the backbone (``tlkeras.models.blocks``): the last block gets
    ``decay``, block 0 (the stem) ``decay**n``. Weighted backbone layers that no block holds get
    the stem's multiplier. ``decay=1`` gives 1 everywhere. ``backbone``: the table row of a bare
    ``keras.applications`` model (as ``tlkeras.models.blocks``).

    Raises:
        ValueError: ``decay`` not in (0, 1], or two variables of the model share a path.
    """
    checks.interval("layer decay", decay, 0, 1, low_open=True)
    variables = _trainable_kind(model)
    paths = [v.path for v in variables]
    if len(set(paths)) != len(paths):
        duplicates = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(
            f"block_lr_multipliers: expected unique variable paths, received duplicates {duplicates}"
        )
    all_blocks = blocks(model, backbone)
    n = len(all_blocks)
    by_id: dict[int, float] = {}
    for block in all_blocks:
        scale = float(decay) ** (n - block.index)
        for layer in block.layers:
            for variable in _trainable_kind(layer):
                by_id[id(variable)] = scale
    backbone = {id(v) for v in _trainable_kind(get_backbone_model(model))}
    smallest = float(decay) ** n
    return {v.path: by_id.get(id(v), smallest if id(v) in backbone else 1.0) for v in variables}


class _BlockLR:
    """Mixin: each variable's update (and decoupled weight decay) at ``lr × multiplier(path)``.

    The multiplier is a Python float looked up when the update step is traced, by the variable's
    key (``_var_key``: the optimizer's own identity for a variable, which also names the tf.Variable
    Keras hands ``update_step`` on the TensorFlow backend, per replica under ``tf.distribute``).
    """

    def __init__(
        self,
        *args: Any,
        lr_multipliers: Mapping[str, float] | None = None,
        no_decay: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_block_lr(lr_multipliers)
        if no_decay:
            self.exclude_from_weight_decay(var_names=list(no_decay))

    def get_config(self) -> dict[str, Any]:
        return self._block_lr_config(super().get_config())

    def _init_block_lr(self, lr_multipliers: Mapping[str, float] | None) -> None:
        table = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        bad = {k: v for k, v in table.items() if not v > 0}
        if bad:
            raise ValueError(f"lr_multipliers: expected numbers > 0, received {bad}")
        self._lr_multipliers = table
        self._multiplier_by_key: dict[Any, float] = {}
        self._no_decay_names: list[str] | None = None
        # Set by tlkeras.fitting.optimizers.SwapEMAWeights: the model holds the EMA weights already.
        self._ema_in_model = False

    def build(self, variables):
        super().build(variables)
        if self._lr_multipliers:
            missing = [v.path for v in variables if v.path not in self._lr_multipliers]
            if missing:
                logger.warning("lr_multipliers: no entry for %s (they train at 1x)", missing)
            self._multiplier_by_key = {
                self._var_key(v): self._lr_multipliers.get(v.path, 1.0) for v in variables
            }

    def lr_multiplier(self, variable) -> float:
        """The learning-rate multiplier of ``variable`` (1.0 when the table has none)."""
        return self._multiplier_by_key.get(self._var_key(variable), 1.0)

    def update_step(self, gradient, variable, learning_rate):
        scale = self.lr_multiplier(variable)
        if scale != 1.0:
            learning_rate = learning_rate * scale
        return super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return

        def decay(variable):
            if self._use_weight_decay(variable):
                lr = keras.ops.cast(self.learning_rate, variable.dtype) * self.lr_multiplier(
                    variable
                )
                wd = keras.ops.cast(self.weight_decay, variable.dtype)
                variable.assign_sub(variable * wd * lr)

        if keras.backend.backend() != "tensorflow":
            for variable in variables:
                decay(variable)
            return

        # As TFOptimizer._apply_weight_decay: each variable updated in its distribution strategy.
        def distributed(distribution, variables):
            for variable in variables:
                if isinstance(variable, keras.Variable):
                    variable = variable.value
                distribution.extended.update(variable, decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            distributed, self._distribution_strategy, variables
        )

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        # Keras does not serialize the exclusions: get_config records the names.
        self._no_decay_names = list(var_names) if var_names else None

    def finalize_variable_values(self, var_list):
        if self.use_ema and self._ema_in_model:
            return  # the EMA weights were swapped in at the last epoch's end (and maybe restored)
        super().finalize_variable_values(var_list)

    def _block_lr_config(self, config: dict[str, Any]) -> dict[str, Any]:
        config["lr_multipliers"] = dict(self._lr_multipliers) or None
        config["no_decay"] = self._no_decay_names
        return config


@keras.saving.register_keras_serializable(package="tlkeras")
class AdamW(_BlockLR, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with per-variable learning-rate multipliers.

    Args:
        lr_multipliers: ``{variable.path: multiplier}`` (``block_lr_multipliers``); variables
            without an entry train at the learning rate itself.
        no_decay: name fragments of variables excluded from weight decay
            (``exclude_from_weight_decay(var_names=...)``, recorded in the config).
        **kwargs: ``keras.optimizers.AdamW``'s.
    """


@keras.saving.register_keras_serializable(package="tlkeras")
class SGD(_BlockLR, keras.optimizers.SGD):
    """``keras.optimizers.SGD`` with per-variable learning-rate multipliers (args as :class:`AdamW`)."""


def check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    """``tlkeras.checks.choice(what, value, choices)``, in the argument order of its old callers."""
    return checks.choice(what, value, choices)


def make_optimizer(
    name: str,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float,
    *,
    lr_multipliers: Mapping[str, float] | None = None,
    ema: bool = False,
    ema_momentum: float = 0.99,
) -> keras.optimizers.Optimizer:
    """A fresh optimizer ``name`` (``OPTIMIZERS``) decaying only kernels (biases and BN excluded).

    ``"adamw"``: AdamW. ``"sgd"``: SGD with Nesterov momentum 0.9 and Keras's decoupled weight
    decay. ``lr_multipliers``: per-variable learning-rate multipliers by path
    (``block_lr_multipliers``). ``ema``: keep an exponential moving average of the weights
    (``use_ema``; pair with :class:`SwapEMAWeights`).
    """
    checks.choice("optimizer", name, OPTIMIZERS)
    common = {
        "learning_rate": learning_rate,
        "weight_decay": float(weight_decay),
        "lr_multipliers": lr_multipliers,
        "no_decay": list(NO_DECAY),
        "use_ema": bool(ema),
        "ema_momentum": float(ema_momentum),
    }
    if name == ADAMW:
        return AdamW(**common)
    return SGD(momentum=SGD_MOMENTUM, nesterov=True, **common)


def phase_schedule(
    learning_rate: float, *, schedule: str, total_steps: int, warmup_steps: int
) -> float | keras.optimizers.schedules.CosineDecay:
    """A phase's learning rate over its ``total_steps`` optimizer steps.

    ``"constant"``: ``learning_rate`` (warm-up needs a schedule: ``warmup_steps`` must be 0).
    ``"cosine"``: a linear warm-up from ``learning_rate / warmup_steps`` to ``learning_rate``
    over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.
    """
    checks.choice("schedule", schedule, SCHEDULES)
    for name, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps)):
        checks.integer(name, value, 0)
    if schedule == CONSTANT:
        if warmup_steps:
            raise ValueError(
                f"warmup_steps: expected 0 with schedule='constant' (warm-up is part of the "
                f"cosine schedule), received {warmup_steps}"
            )
        return float(learning_rate)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps: expected fewer than total_steps={total_steps}, received {warmup_steps}"
        )
    if not warmup_steps:
        return keras.optimizers.schedules.CosineDecay(float(learning_rate), total_steps)
    return keras.optimizers.schedules.CosineDecay(
        float(learning_rate) / warmup_steps,  # ~0, but the first step is not wasted
        decay_steps=total_steps - warmup_steps,
        warmup_target=float(learning_rate),
        warmup_steps=warmup_steps,
    )


def _unwrapped(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    return getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer


class SwapEMAWeights(keras.callbacks.SwapEMAWeights):
    """Keras's ``SwapEMAWeights(swap_on_epoch=True)``, leaving the EMA weights in the model.

    Put it first among the callbacks: from each epoch's end to the next epoch's start the model
    holds the EMA weights, so validation, early stopping and checkpoints see them. Keras's own
    callback relies on ending at the last epoch of the budget: when a fit stops earlier (early
    stopping), ``fit``'s closing ``finalize_variable_values`` would copy the averages, which then
    hold the raw weights, into the model. With this callback the optimizers of this module skip
    that copy while the model holds the EMA weights. A backup (``BackupAndRestore``) is written
    while the weights are swapped; a fit resumed from one (its optimizer has taken steps before
    the first epoch begins) swaps them back before training.
    """

    def __init__(self) -> None:
        super().__init__(swap_on_epoch=True)
        self._first_epoch = True

    def _mark(self) -> None:
        optimizer = _unwrapped(self.model.optimizer)
        if hasattr(optimizer, "_ema_in_model"):
            optimizer._ema_in_model = self._ema_weights_in_model

    def on_train_begin(self, logs=None):
        self._ema_weights_in_model = False
        self._first_epoch = True
        self._mark()

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self._first_epoch = False
            optimizer = _unwrapped(self.model.optimizer)
            # A phase's optimizer is fresh: steps taken before the first epoch come from a backup,
            # written after an epoch-end swap (EMA weights in the model, raw ones in the averages).
            if optimizer.built and int(keras.ops.convert_to_numpy(optimizer.iterations)) > 0:
                self._ema_weights_in_model = True
        super().on_epoch_begin(epoch, logs)
        self._mark()

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self._mark()

    def on_train_end(self, logs=None):
        if self._ema_weights_in_model:
            self._finalize_ema_values()  # the averages hold the EMA weights again, as the model
        self._mark()
