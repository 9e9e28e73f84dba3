"""The transferability curve: validation accuracy against the freeze point k (Yosinski et al. 2014).

Every row starts as ``tlkeras.train`` does, from a head warmed up on the frozen backbone (one
warm-up, shared by the rows), so the curve measures the freeze point, not a missing warm-up.
For each block index k, ``sweep`` then trains the ``partial(k)`` model (blocks < k frozen, pretrained
blocks >= k and the head train) on the fast frozen path (``tlkeras.fitting.fast_path.fit_frozen``: the
frozen prefix runs once per k, at the block boundary). ``k == num_blocks`` freezes the whole
backbone (``feature_extraction``). With ``fine_tune=True`` each model is then fine-tuned end to end
at a small learning rate (Yosinski's "transferred + fine-tuned" curve). A from-scratch model of the
same architecture gives the baseline line.

The recommendation among the rows and the files: ``tlkeras.workflows.sweep_report``.

Yosinski, Clune, Bengio & Lipson, "How transferable are features in deep neural networks?",
NeurIPS 2014.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlkeras import checks
from tlkeras.analysis.inputs import as_image_data
from tlkeras.data import DataConfig, ImageData
from tlkeras.fitting.config import FEATURE_EXTRACTION, FULL, PARTIAL, Phase, set_seed
from tlkeras.fitting.config import SCRATCH as SCRATCH_STRATEGY
from tlkeras.fitting.frozen import MODE_FULL_MODEL
from tlkeras.fitting.pretrain import resolve
from tlkeras.fitting.runner import PhaseResult, run_phase
from tlkeras.models.backbones import get_backbone
from tlkeras.models.blocks import BACKBONE_LAYER, blocks, resolve_block_index
from tlkeras.models.builder import AugmentConfig, build_model
from tlkeras.models.task import encode_labels, infer, loss_for, metrics_for
from tlkeras.workflows.sweep_report import (
    DEFAULT_NOISE_SIGMAS,
    FINE_TUNED,
    FROZEN,
    SCRATCH,
    SweepResult,
    SweepRow,
    recommend,
    write,
)

DEFAULT_KS = (2, 5, 8, 11)
DEFAULT_EPOCHS = 10
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_FINE_TUNE_LEARNING_RATE = 1e-5
DEFAULT_PATIENCE = 3
DEFAULT_OUTPUT_DIR = "runs/sweep"


# --------------------------------------------------------------------------------------------
# Training one row


def _evaluate(model: Any, dataset: Any, loss: Any, metrics: Any) -> tuple[float, float]:
    model.compile(optimizer="adam", loss=loss, metrics=metrics)  # evaluation only: nothing trains
    out = model.evaluate(dataset, verbose=0, return_dict=True)
    return float(out["accuracy"]), float(out["loss"])


def _check_ks(ks: Any, all_blocks: Sequence[Any]) -> list[int]:
    if isinstance(ks, (str, bytes, int)) or not isinstance(ks, Sequence) or not ks:
        raise ValueError(f"ks: expected a non-empty list of block indices, received {ks!r}")
    num_blocks = len(all_blocks)
    out = []
    for k in ks:
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k == num_blocks:
            out.append(num_blocks)  # everything frozen: feature extraction
            continue
        try:
            out.append(resolve_block_index(all_blocks, int(k) if isinstance(k, np.integer) else k))
        except ValueError:
            raise ValueError(
                f"ks: expected block indices in 1..{num_blocks} (or -{num_blocks - 1}..-1; "
                f"{num_blocks} freezes the whole backbone), received {k!r}"
            ) from None
    return sorted(set(out))


def _check_settings(
    weights: Any,
    augment: Any,
    *,
    epochs: int,
    fine_tune_epochs: int,
    scratch_epochs: int,
    patience: int,
    noise_sigmas: float,
    learning_rate: float,
    fine_tune_learning_rate: float,
) -> None:
    if weights is None:
        raise ValueError(
            "weights: a sweep transfers pretrained blocks; expected 'imagenet', a weights file or "
            "'source:TASK', received None"
        )
    if augment is not None and not isinstance(augment, AugmentConfig):
        raise TypeError(f"augment: expected an AugmentConfig or None, received {augment!r}")
    for name, value in (
        ("epochs", epochs),
        ("fine_tune_epochs", fine_tune_epochs),
        ("scratch_epochs", scratch_epochs),
    ):
        checks.integer(name, value, 1)
    checks.integer("patience", patience, 0)
    checks.number("noise_sigmas", noise_sigmas, low=0)
    for name, value in (
        ("learning_rate", learning_rate),
        ("fine_tune_learning_rate", fine_tune_learning_rate),
    ):
        checks.number(name, value, low=0, low_open=True)


def _sweep_data(data: Any, image_size: Any, weights: Any, backbone: str, **load_kwargs: Any):
    """``data`` as a single-label ``ImageData`` with a validation split (loaded when needed)."""
    data = as_image_data(data, image_size, weights, backbone, **load_kwargs)
    if data.validation is None:
        raise ValueError("data: expected a validation split to choose k on, received none")
    if data.multilabel:
        raise ValueError("data: expected single-label data, received multi-label data")
    return data


@dataclass
class _Rows:
    """What every row of one sweep shares: how to build its model, train a phase and score it."""

    backbone: str
    backbone_kwargs: dict[str, Any]
    input_shape: tuple[int, int, int]
    num_classes: int
    weights: str | None
    augment: AugmentConfig | None
    datasets: tuple[Any, Any, Any]  # train, validation, test (labels encoded)
    patience: int
    seed: int
    verbose: int
    rows: list[SweepRow] = field(default_factory=list)

    def model(self, strategy: str, k: int | None, weights: Any) -> keras.Model:
        set_seed(self.seed)  # the same head initialisation for every row
        return build_model(
            self.backbone,
            self.num_classes,
            strategy=strategy,
            fine_tune_at=k,
            weights=weights,
            input_shape=self.input_shape,
            backbone_kwargs=self.backbone_kwargs,
            augment=self.augment,
        )

    def train(self, model: keras.Model, phase: Phase) -> PhaseResult:
        # Early stopping on validation loss, best weights restored; patience 0 turns it off.
        stop = keras.callbacks.EarlyStopping(patience=self.patience, restore_best_weights=True)
        early = [stop] if self.patience else []
        train, validation, _ = self.datasets
        keras_verbose = 2 if self.verbose >= 2 else 0
        return run_phase(
            model, phase, train, validation, callbacks=early, seed=self.seed, verbose=keras_verbose
        )

    def add(self, mode: str, k: int | None, block: str, model: keras.Model, result: PhaseResult):
        """Score ``model`` (trained by ``result``) and record it as a row."""
        task, from_logits = infer(model)
        loss = loss_for(task, from_logits=from_logits)
        _, validation, test = self.datasets
        acc, val_loss = _evaluate(
            model, validation, loss, metrics_for(task, from_logits=from_logits)
        )
        test_acc = None
        if test is not None:
            test_acc = _evaluate(model, test, loss, metrics_for(task, from_logits=from_logits))[0]
        row = SweepRow(
            mode,
            k,
            block,
            result.trainable_params,
            acc,
            val_loss,
            test_acc,
            result.epochs_run,
            result.seconds,
            result.fast_path or MODE_FULL_MODEL,
        )
        self.rows.append(row)
        if self.verbose:
            test = "" if row.test_accuracy is None else f", test accuracy {row.test_accuracy:.3f}"
            print(
                f"[sweep] {row.mode} k={row.k}: val accuracy {row.val_accuracy:.3f}{test} "
                f"({row.trainable_params:,} trainable, {row.epochs_run} epochs, "
                f"{row.seconds:.1f}s)",
                flush=True,
            )


def _make_rows(
    backbone: str,
    data: ImageData,
    ks: Any,
    weights: Any,
    backbone_kwargs: dict[str, Any],
    augment: AugmentConfig | None,
    patience: int,
    seed: int,
    verbose: int,
) -> tuple[_Rows, tuple[str, ...], list[int]]:
    """The rows' shared settings, the block names and the checked ``ks`` (from a probe model)."""
    input_shape = (*data.image_size, 3)
    probe = build_model(
        backbone,
        data.num_classes,
        weights=None,
        input_shape=input_shape,
        backbone_kwargs=backbone_kwargs,
    )
    names = tuple(b.name for b in blocks(probe))
    resolved_ks = _check_ks(ks, blocks(probe))
    task = infer(probe)[0]
    del probe
    splits = (data.train, data.validation, data.test)
    rows = _Rows(
        backbone,
        backbone_kwargs,
        input_shape,
        data.num_classes,
        resolve(weights, backbone, backbone_kwargs, input_shape),
        augment,
        tuple(encode_labels(d, task, data.num_classes) for d in splits),
        patience,
        seed,
        verbose,
    )
    return rows, names, resolved_ks


def _warm_head(rows: _Rows, learning_rate: float, epochs: int) -> tuple[dict[str, list], dict]:
    """The head warmed up once on the frozen backbone, as every row of ``train`` starts.

    Returns the weights of every layer outside the backbone (by name) and a summary.
    """
    model = rows.model(FEATURE_EXTRACTION, None, rows.weights)
    result = rows.train(
        model, Phase("head warm-up", FEATURE_EXTRACTION, None, learning_rate, epochs, fast=True)
    )
    head = {
        layer.name: layer.get_weights()
        for layer in model.layers
        if layer.name != BACKBONE_LAYER and layer.weights
    }
    summary = {
        "epochs_run": result.epochs_run,
        "seconds": round(result.seconds, 3),
        "fast_path": result.fast_path,
    }
    del model
    keras.backend.clear_session(free_memory=True)
    return head, summary


def sweep(
    data: Any,
    backbone: str,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    weights: str | None = "imagenet",
    backbone_kwargs: dict[str, Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
    fine_tune: bool = False,
    epochs: int = DEFAULT_EPOCHS,
    fine_tune_epochs: int | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    fine_tune_learning_rate: float = DEFAULT_FINE_TUNE_LEARNING_RATE,
    baseline_scratch: bool = True,
    scratch_epochs: int | None = None,
    augment: Any = None,
    patience: int = DEFAULT_PATIENCE,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
    batch_size: int = 32,
    validation_split: float = 0.2,
    test_split: float = 0.2,
    seed: int = 0,
    max_bad_fraction: float = DataConfig.max_bad_fraction,
    validation_data: Any = None,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    verbose: int = 0,
) -> SweepResult:
    """Train ``partial(k)`` for every k in ``ks`` and plot validation accuracy against k.

    Every row starts, as ``tlkeras.train`` does, from a head warmed up on the frozen backbone
    (once, shared by the rows: ``epochs`` at ``learning_rate`` on the fast path), so the curve
    measures the freeze point and not a missing warm-up.

    Args:
        data: a ``tlkeras.data.ImageData`` with a validation split, or anything
            ``tlkeras.data.load`` accepts (loaded at ``image_size`` with ``validation_split``,
            ``test_split``, ``batch_size``, ``seed`` and ``max_bad_fraction``).
        validation_data: validation data in any form ``tlkeras.data.load`` accepts, instead of
            a ``validation_split`` of ``data`` (which then gives only the test split).
        backbone, backbone_kwargs: as ``tlkeras.build_model``.
        ks: block indices (``tlkeras.models.blocks``); blocks < k are frozen. Negative counts from the
            end; ``len(blocks)`` freezes the whole backbone.
        weights: ``"imagenet"``, a weights file or ``"source:TASK"``.
        fine_tune: after each frozen-prefix run, fine-tune the whole model for
            ``fine_tune_epochs`` (default ``epochs``) at ``fine_tune_learning_rate``.
        epochs: epochs of the head warm-up and of each frozen-prefix run (fast frozen path), at
            ``learning_rate``.
        baseline_scratch: also train the architecture from random init for ``scratch_epochs``
            (default: the transferred models' total epochs) as the baseline line.
        augment: an ``AugmentConfig`` (cached augmented views on the fast path) or ``None``.
        patience: early stopping on validation loss (best weights restored); 0 disables it.
        noise_sigmas: rows within this many noise standard deviations of the best are ties.
        output_dir: where ``sweep.json``, ``sweep.csv`` and ``sweep.png`` are written.
        verbose: 0 quiet, 1 one line per row, 2 also Keras's per-epoch lines.

    Returns:
        A ``SweepResult``.
    """
    spec = get_backbone(backbone)
    backbone_kwargs = dict(backbone_kwargs or {})
    fine_tune_epochs = epochs if fine_tune_epochs is None else fine_tune_epochs
    total_epochs = epochs + (fine_tune_epochs if fine_tune else 0)
    scratch_epochs = total_epochs if scratch_epochs is None else scratch_epochs
    _check_settings(
        weights,
        augment,
        epochs=epochs,
        fine_tune_epochs=fine_tune_epochs,
        scratch_epochs=scratch_epochs,
        patience=patience,
        noise_sigmas=noise_sigmas,
        learning_rate=learning_rate,
        fine_tune_learning_rate=fine_tune_learning_rate,
    )
    data = _sweep_data(
        data,
        image_size,
        weights,
        spec.name,
        batch_size=batch_size,
        validation_split=validation_split,
        test_split=test_split,
        seed=seed,
        max_bad_fraction=max_bad_fraction,
        validation=validation_data,
    )
    rows, names, resolved_ks = _make_rows(
        spec.name, data, ks, weights, backbone_kwargs, augment, patience, seed, verbose
    )
    head, warm_up = _warm_head(rows, learning_rate, epochs)
    fine_tuning = (
        Phase("fine-tuning", FULL, None, fine_tune_learning_rate, fine_tune_epochs)
        if fine_tune
        else None
    )
    _transfer_rows(rows, names, resolved_ks, head, learning_rate, epochs, fine_tuning)
    if baseline_scratch:
        model = rows.model(SCRATCH_STRATEGY, None, None)
        phase = Phase("scratch", SCRATCH_STRATEGY, None, learning_rate, scratch_epochs)
        rows.add(SCRATCH, None, names[0], model, rows.train(model, phase))
        del model
    settings = {
        "ks": resolved_ks,
        "fine_tune": fine_tune,
        "epochs": epochs,
        "head_warm_up": warm_up,
        "fine_tune_epochs": fine_tune_epochs if fine_tune else None,
        "scratch_epochs": scratch_epochs if baseline_scratch else None,
        "learning_rate": learning_rate,
        "fine_tune_learning_rate": fine_tune_learning_rate if fine_tune else None,
        "patience": patience,
        "augment": dataclasses.asdict(augment) if augment is not None else None,
        "seed": seed,
        "data": data.to_dict(),
    }
    result = _result(rows, names, data, noise_sigmas, settings)
    paths = write(result, output_dir)
    return dataclasses.replace(result, paths={k: str(v) for k, v in paths.items()})


def _transfer_rows(
    rows: _Rows,
    names: tuple[str, ...],
    ks: Sequence[int],
    head: dict[str, list],
    learning_rate: float,
    epochs: int,
    fine_tuning: Phase | None,
) -> None:
    """The frozen row of every k (from the warmed head), each then fine-tuned when asked."""
    for k in ks:
        all_frozen = k == len(names)
        strategy, fine_tune_at = (FEATURE_EXTRACTION, None) if all_frozen else (PARTIAL, k)
        model = rows.model(strategy, fine_tune_at, rows.weights)
        for name, values in head.items():
            model.get_layer(name).set_weights(values)
        block = "-" if all_frozen else names[k]
        phase = Phase("frozen prefix", strategy, fine_tune_at, learning_rate, epochs, fast=True)
        rows.add(FROZEN, k, block, model, rows.train(model, phase))
        if fine_tuning is not None:
            rows.add(FINE_TUNED, k, block, model, rows.train(model, fine_tuning))
        del model
        keras.backend.clear_session(free_memory=True)


def _result(
    rows: _Rows, names: tuple[str, ...], data: ImageData, noise_sigmas: float, settings: dict
) -> SweepResult:
    num_validation = int(sum(data.counts["validation"].values()))
    recommended, best, noise = recommend(rows.rows, num_validation, noise_sigmas)
    return SweepResult(
        rows=tuple(rows.rows),
        recommended=recommended,
        best=best,
        noise=noise,
        noise_sigmas=float(noise_sigmas),
        num_validation=num_validation,
        num_blocks=len(names),
        block_names=names,
        backbone=rows.backbone,
        backbone_kwargs=rows.backbone_kwargs,
        weights=None if rows.weights is None else str(rows.weights),
        image_size=tuple(data.image_size),
        settings=settings,
    )
