"""How a run's phases are planned: the two-phase recipe, the schedule choice, gradual unfreezing.

:func:`plan_phases` turns a ``tlkeras.fitting.config.TrainConfig`` into the recipe of the Keras
transfer-learning guide: a head warm-up on the frozen backbone, then (for ``partial``/``full``)
fine-tuning at a smaller learning rate, optionally unfreezing the backbone top-down in stages
(ULMFiT's gradual unfreezing); ``scratch`` is one phase. ``schedule="auto"`` chooses each phase's
learning-rate schedule (``AUTO_WARMUP_EPOCHS``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tlkeras import checks
from tlkeras.fitting.config import (
    FEATURE_EXTRACTION,
    FINE_TUNING,
    FULL,
    HEAD_WARM_UP,
    PARTIAL,
    SCRATCH,
    Phase,
    TrainConfig,
)
from tlkeras.fitting.optimizers import AUTO_SCHEDULE, CONSTANT, COSINE
from tlkeras.models.strategy import Strategy

# schedule="auto" (the default): fine-tuning of two epochs or more decays by a cosine after this
# many warm-up epochs; the head warm-up and scratch keep a constant rate. Measured on CIFAR-10
# (96 px, 6,000 training images, full, 5 epochs at 1e-4, validation accuracy from the solved
# head's 0.69): constant 0.72, cosine after one warm-up epoch 0.74 (flips only, as thumbnails get);
# on photos the recipe ablation found it neutral (ants/bees +1.4, cats/dogs -0.2 points, within the
# seed spread: BENCHMARKS.md recipe_*).
AUTO_WARMUP_EPOCHS = 1


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
    if not checks.is_int(num_blocks):
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
