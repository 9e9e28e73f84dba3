"""Two-phase transfer-learning training with resumable, never-overwritten run directories.

The recipe (Keras transfer-learning guide, fastai, ULMFiT):

1. **Phase 1 — head warm-up.** ``apply_strategy(model, "feature_extraction")`` freezes the whole
   backbone; the head trains at ``learning_rate``. When the frozen part sees no trainable layer, the
   fast frozen path (:func:`tlkeras.features.fit_frozen`) trains the head on features computed once.
2. **Phase 2 — fine-tuning** (``partial``/``full`` only). ``apply_strategy(model, strategy,
   fine_tune_at)`` unfreezes, the model is **recompiled** with ``fine_tune_learning_rate`` (default
   ``learning_rate / 10``) and epochs continue from where phase 1 stopped (``initial_epoch``).

``scratch`` trains every layer from random initialisation in one phase of ``epochs + fine_tune_epochs``
epochs (the same epoch budget as the two-phase strategies), at ``learning_rate``.

Guards: AdamW weight decay, label smoothing, EarlyStopping with best-weights restore, optional
ReduceLROnPlateau, TerminateOnNaN (turned into a ``ValueError`` naming the epoch and learning rate).

Run directory (``run_dir``): every file in it, its state and the resume rules are ``tlkeras.rundir``'s
(re-running the same call after a kill resumes in the same phase and epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import data as data_lib
from tlkeras import distribute, features, reports, savedmodel
from tlkeras import weights as weights_lib
from tlkeras.blocks import blocks
from tlkeras.exported import load_exported
from tlkeras.model import AugmentConfig, HeadConfig, build_model, get_spec
from tlkeras.rundir import (
    BACKUP_DIR,
    BEST_MODEL,
    check_run_dir,
    merged_history,
    normal_fingerprint,
    phase_backup,
    phase_csv,
    phase_tensorboard,
    phase_weights,
    prepare_run_dir,
    read_phase_csv,
    read_state,
    write_state,
)
from tlkeras.strategy import Strategy, apply_strategy, check_fine_tune_at, scratch_batchnorm
from tlkeras.task import encode_labels, infer, loss_for, metrics_for

logger = logging.getLogger("tlkeras.training")

# Phase plans hold strategies as their plain values: they are written to run_state.json.
SCRATCH, FEATURE_EXTRACTION = Strategy.SCRATCH.value, Strategy.FEATURE_EXTRACTION.value
PARTIAL, FULL = Strategy.PARTIAL.value, Strategy.FULL.value


# --------------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------------


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
        fast: use the fast frozen path for phase 1 when it is valid.
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
        cw = self.class_weight
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
        _check_int("early_stopping_patience", self.early_stopping_patience, 0)
        _check_int("seed", self.seed, 0)
        for name in ("reduce_lr_on_plateau", "fast"):
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


@dataclass
class RunResult:
    """What :func:`fit`/:func:`train` return.

    Attributes:
        model: the trained ``keras.Model`` (best validation-loss weights across both phases).
        history: merged per-epoch history: column -> list, with ``epoch`` and ``phase`` columns and
            ``"phase_boundary"`` (first epoch of phase 2, or ``None``).
        metrics: the ``metrics.json`` content (test-split metrics, data counts, phases).
        run_dir: the run directory.
        export: the ``tlkeras.ExportResult`` when :func:`train` exported, else ``None``.
    """

    model: keras.Model
    history: dict[str, Any]
    metrics: dict[str, Any]
    run_dir: Path
    export: Any = None


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow for a reproducible run."""
    keras.utils.set_random_seed(int(seed))


# --------------------------------------------------------------------------------------------------
# Class weights
# --------------------------------------------------------------------------------------------------


def _class_weight(config: TrainConfig, data: Any, task: str) -> dict[int, float] | None:
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


# --------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------


class _LogLearningRate(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to the epoch logs (for CSV/TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.model.optimizer is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class _BackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` keeping two epochs, falling back when a backup can't be read.

    Keras's ``double_checkpoint`` falls back to the previous epoch on ``OSError`` only; a truncated
    HDF5 or JSON file may raise ``ValueError``/``KeyError`` too. When neither backup loads, the phase
    restarts from its initial weights with a logged warning instead of failing the run.
    """

    def __init__(self, backup_dir: str):
        super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)
        self.restored_epoch: int | None = None
        self._initial_weights = None

    def on_train_begin(self, logs=None):
        self._initial_weights = self.model.get_weights()
        self.model._initial_epoch = None  # a stale value from an earlier fit would skip epochs
        for attempt in ("latest", "previous"):
            try:
                self._load_model()
                self.restored_epoch = self.model._initial_epoch
                return
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("Backup %s in %s unreadable (%s).", attempt, self.backup_dir, e)
                if attempt == "previous" or not os.path.exists(self._prev_weights_path):
                    break
                shutil.copy(self._prev_weights_path, self._weights_path)
                if os.path.exists(self._prev_training_metadata_path):
                    shutil.copy(self._prev_training_metadata_path, self._training_metadata_path)
        logger.warning("No usable backup in %s: restarting this phase.", self.backup_dir)
        print(
            f"WARNING: no usable backup in {self.backup_dir}: restarting this phase from its start"
        )
        self.model.set_weights(self._initial_weights)
        self.model._initial_epoch = None
        shutil.rmtree(self.backup_dir, ignore_errors=True)


class _TrainingFailed(Exception):
    pass


def _trainable_params(model: keras.Model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def _phases(strategy: str, fine_tune_at: int | None, config: TrainConfig) -> list[dict[str, Any]]:
    if strategy == SCRATCH:
        return [
            {
                "name": SCRATCH,
                "strategy": SCRATCH,
                "fine_tune_at": None,
                "learning_rate": float(config.learning_rate),
                "epochs": config.epochs + config.fine_tune_epochs,
            }
        ]
    phases = []
    if config.epochs > 0:
        phases.append(
            {
                "name": "head warm-up",
                "strategy": FEATURE_EXTRACTION,
                "fine_tune_at": None,
                "learning_rate": float(config.learning_rate),
                "epochs": config.epochs,
            }
        )
    if strategy in (PARTIAL, FULL) and config.fine_tune_epochs > 0:
        phases.append(
            {
                "name": "fine-tuning",
                "strategy": strategy,
                "fine_tune_at": fine_tune_at,
                "learning_rate": config.resolved_fine_tune_learning_rate,
                "epochs": config.fine_tune_epochs,
            }
        )
    if not phases:
        raise ValueError(
            f"strategy={strategy!r}: expected epochs >= 1 (it has no fine-tuning phase), received "
            f"epochs={config.epochs}"
        )
    return phases


def _optimizer(learning_rate: float, weight_decay: float) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    # Decay only kernels: decaying biases and BN scale/offset hurts and is not what L2 intends.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def _fast_path(model: keras.Model):
    """``(fit_frozen, plan_description)`` when the fast frozen path is valid now, else ``(None, why)``."""
    try:
        plan = features.fast_path_plan(model, None)
    except (ValueError, TypeError) as e:
        return None, f"not valid ({e})"
    if not plan.valid:
        return None, plan.reason
    return features.fit_frozen, plan.mode


def _tensorboard_available() -> bool:
    # tf.summary needs the separate `tensorboard` package, which TensorFlow no longer pulls in.
    return importlib.util.find_spec("tensorboard") is not None


def _nan_epoch(history: Mapping[str, list]) -> int | None:
    for i, value in enumerate(history.get("loss", [])):
        if value is None or not math.isfinite(float(value)):
            return i
    return None


def _evaluate(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    # A plain call, not predict_on_batch: under a strategy that would split (or gather across
    # workers) a batch that only this process evaluates.
    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    ys, probs = [], []
    for x, y in dataset:
        probs.append(np.asarray(predict(x)))
        ys.append(np.asarray(y))
    if not ys:
        raise ValueError("expected a non-empty evaluation dataset, received 0 batches")
    return np.concatenate(ys), np.concatenate(probs)


def _model_description(model: keras.Model) -> dict[str, Any]:
    try:
        return get_spec(model).to_dict()
    except (ValueError, AttributeError, KeyError):
        return {"name": model.name, "params": int(model.count_params())}


def fit(
    model: keras.Model,
    data: Any,
    config: TrainConfig | None = None,
    *,
    run_dir: str | Path,
    strategy: str | None = None,
    fine_tune_at: int | None = None,
    overwrite: bool = False,
    verbose: int = 1,
    _before_done=None,
) -> RunResult:
    """Train ``model`` on ``data`` in two phases; write reports and the best model to ``run_dir``.

    Re-running the same call on the same ``run_dir`` after an interruption resumes in the phase and
    epoch where it stopped. Final metrics are computed on ``data.test`` (never trained or
    early-stopped on; ``data.validation`` drives early stopping and the best checkpoint).

    A model built under a ``tf.distribute`` strategy's scope trains in that strategy (see
    ``tlkeras.distribute``): batch ``data`` by the global batch (per-replica batch × replicas);
    on several workers run the same call on each, and only the chief writes ``run_dir``.

    Args:
        model: a model from ``tlkeras.build_model`` (or any model with a ``predictions`` layer and
            a ``backbone`` nested model the strategy functions understand).
        data: a ``tlkeras.data.ImageData``.
        config: hyper-parameters; ``TrainConfig()`` when ``None``.
        run_dir: the run directory (created; see the module docstring).
        strategy: ``scratch``/``feature_extraction``/``partial``/``full``; defaults to the model's
            own (``tlkeras.get_spec(model).strategy``).
        fine_tune_at: first trainable block for ``partial``; defaults to the model's own.
        overwrite: replace a finished run in ``run_dir`` instead of refusing.
        verbose: Keras verbosity (0 silent, 1 progress bars, 2 one line per epoch).

    Raises:
        ValueError: the loss became NaN (names the epoch and learning rate), bad settings.
        FileExistsError: ``run_dir`` holds a finished run and ``overwrite`` is False.
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, received {type(config).__name__}")
    spec = _model_description(model)
    strategy = Strategy.parse(strategy or spec.get("strategy") or FULL).value
    if fine_tune_at is None and strategy == PARTIAL:
        fine_tune_at = spec.get("fine_tune_at")
    if fine_tune_at is not None and strategy != PARTIAL:
        raise ValueError(
            f"fine_tune_at: expected None unless strategy='partial', received {fine_tune_at} with "
            f"strategy={strategy!r}"
        )
    train_bn = bool(spec.get("train_bn", False))
    task, from_logits = infer(model)
    class_names = list(data.class_names)
    num_classes = len(class_names)
    if data.validation is None:
        logger.warning("No validation split: early stopping and checkpoints monitor training loss.")
    monitor = "val_loss" if data.validation is not None else "loss"
    class_weight = _class_weight(config, data, task)
    phases = _phases(strategy, fine_tune_at, config)

    run_dir = Path(run_dir)
    strategy_tf = model.distribute_strategy  # the tf.distribute strategy the model was built in
    chief = distribute.is_chief(strategy_tf)
    fingerprint = {
        "config": config.to_dict(),
        "strategy": strategy,
        "fine_tune_at": fine_tune_at,
        "model": spec,
        "class_names": class_names,
        "source": str(getattr(data, "source", "")),
    }
    shared_run_dir = run_dir  # what the caller named; a non-chief worker trains in a copy of it
    if distribute.is_multi_worker(strategy_tf):
        # Every worker checks (and raises) before the chief writes; then the others copy the
        # chief's run directory and work in that copy: the same resume point, no shared writes.
        check_run_dir(run_dir, normal_fingerprint(fingerprint), overwrite=overwrite)
        distribute.barrier(strategy_tf)
        if chief:
            prepare_run_dir(run_dir, fingerprint, overwrite=overwrite)
        distribute.barrier(strategy_tf)
        if not chief:
            run_dir = distribute.worker_copy(run_dir, strategy_tf)
        state = read_state(run_dir)
    else:
        state = prepare_run_dir(run_dir, fingerprint, overwrite=overwrite)
    distribute.sync_from_chief(model, strategy_tf)  # weights loaded per worker may differ
    set_seed(config.seed)

    train_ds = distribute.shard_by_data(encode_labels(data.train, task, num_classes), strategy_tf)
    val_ds = distribute.shard_by_data(
        encode_labels(data.validation, task, num_classes), strategy_tf
    )
    best_path = run_dir / BEST_MODEL
    done_before = {k for k, v in state["phases"].items() if v.get("done")}
    initial_epoch = 0
    phase_info: list[dict[str, Any]] = []
    for number, phase in enumerate(phases, start=1):
        key = str(number)
        record = state["phases"].get(key, {})
        if record.get("done"):
            initial_epoch += record["epochs_run"]
            phase_info.append(record)
            continue
        if number > 1 and str(number - 1) in done_before:
            # Resuming: phase N starts from the end of phase N-1, finished by an earlier process.
            with warnings.catch_warnings():  # the file's optimizer state is phase N-1's
                warnings.simplefilter("ignore")
                model.load_weights(run_dir / phase_weights(number - 1))
        apply_strategy(model, phase["strategy"], phase["fine_tune_at"], train_bn=train_bn)
        if phase["strategy"] == SCRATCH:
            scratch_batchnorm(model)
        trainable = _trainable_params(model)
        loss = loss_for(task, from_logits=from_logits, label_smoothing=config.label_smoothing)
        with strategy_tf.scope():  # optimizer and metric variables live on every replica
            optimizer = _optimizer(phase["learning_rate"], config.weight_decay)
            metrics = metrics_for(task, from_logits=from_logits)
        best_so_far = min(
            (
                r[monitor]
                for p in range(1, number + 1)
                for r in read_phase_csv(run_dir / phase_csv(p))
                if monitor in r and math.isfinite(r[monitor])
            ),
            default=None,
        )
        backup = _BackupAndRestore(str(run_dir / phase_backup(number)))
        callbacks: list[keras.callbacks.Callback] = [
            _LogLearningRate(),
            keras.callbacks.TerminateOnNaN(),
        ]
        if config.early_stopping_patience > 0 and data.validation is not None:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=monitor,
                    patience=config.early_stopping_patience,
                    restore_best_weights=True,
                    verbose=min(verbose, 1),
                )
            )
        if config.reduce_lr_on_plateau:
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=monitor,
                    factor=0.5,
                    patience=max(1, config.early_stopping_patience // 2),
                    verbose=min(verbose, 1),
                )
            )
        callbacks += [
            features.SaveFullModel(
                model,
                str(best_path),
                monitor=monitor,
                save_best_only=True,
                initial_value_threshold=best_so_far,
            ),
            keras.callbacks.CSVLogger(str(run_dir / phase_csv(number)), append=True),
            backup,  # last: an epoch is logged before it is backed up
        ]
        if _tensorboard_available():
            callbacks.insert(
                -2,
                keras.callbacks.TensorBoard(
                    str(run_dir / phase_tensorboard(number)), write_graph=False
                ),
            )
        elif number == 1 and verbose:
            print("TensorBoard logs off: the `tensorboard` package is not installed")

        fit_frozen, fast_note = (None, "off")
        if phase["strategy"] == FEATURE_EXTRACTION and config.fast:
            if distribute.is_distributed(strategy_tf):
                # Cached features would be computed on one device, outside the strategy.
                fast_note = "off under tf.distribute (the frozen phase trains end to end)"
            else:
                fit_frozen, fast_note = _fast_path(model)
        if verbose:
            print(
                f"Phase {number}/{len(phases)} ({phase['name']}): strategy={phase['strategy']} "
                f"fine_tune_at={phase['fine_tune_at']} learning_rate={phase['learning_rate']:g} "
                f"trainable params={trainable:,} fast path: "
                f"{fast_note if fit_frozen else 'no — ' + fast_note}"
            )
        model._initial_epoch = None  # see _BackupAndRestore.on_train_begin
        started = time.perf_counter()
        if fit_frozen is not None:
            history = fit_frozen(
                model,
                train_ds,
                val_ds,
                epochs=phase["epochs"],
                optimizer=optimizer,
                loss=loss,
                metrics=metrics,
                callbacks=callbacks,
                class_weight=class_weight,
                seed=config.seed,
                verbose=verbose,
            )
        else:
            with strategy_tf.scope():
                model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
            with (
                distribute.keras_fixes(strategy_tf),
                distribute.lost_worker_as_error(strategy_tf, shared_run_dir),
                warnings.catch_warnings(),
            ):
                # One pass over the finite dataset is one epoch: Keras's "ran out of data" is noise.
                warnings.filterwarnings("ignore", message="Your input ran out of data")
                history = model.fit(
                    train_ds,
                    validation_data=val_ds,
                    shuffle=False,  # the pipeline shuffles (seeded: the same order on every worker)
                    epochs=initial_epoch + phase["epochs"],
                    initial_epoch=initial_epoch,
                    callbacks=callbacks,
                    class_weight=class_weight,
                    verbose=verbose,
                )
        model._initial_epoch = None
        elapsed = time.perf_counter() - started

        bad = _nan_epoch(history.history)
        if bad is not None:
            epoch = history.epoch[bad] + 1 if history.epoch else bad + 1
            state["status"] = "failed"
            write_state(run_dir, state)
            raise ValueError(
                f"loss became NaN at epoch {epoch} (phase {number}, {phase['name']}) with "
                f"learning_rate={phase['learning_rate']:g}; expected a smaller learning rate "
                "(--learning_rate / --fine_tune_learning_rate)"
            )
        rows = read_phase_csv(run_dir / phase_csv(number))
        epochs_run = len(rows) if rows else len(history.history.get("loss", []))
        resumed_at = backup.restored_epoch
        record = {
            "phase": number,
            "name": phase["name"],
            "strategy": phase["strategy"],
            "fine_tune_at": phase["fine_tune_at"],
            "learning_rate": phase["learning_rate"],
            "epochs_planned": phase["epochs"],
            "epochs_run": epochs_run,
            "first_epoch": initial_epoch,
            "resumed_at_epoch": resumed_at,
            "trainable_params": trainable,
            "wall_time_s": float(record.get("wall_time_s", 0.0)) + elapsed,
            "fast_path": fast_note if fit_frozen else None,
            "done": True,
        }
        weights_path = run_dir / phase_weights(number)
        tmp_weights = run_dir / f"phase{number}.tmp.weights.h5"
        model.save_weights(tmp_weights)
        os.replace(tmp_weights, weights_path)
        state["phases"][key] = record
        write_state(run_dir, state)
        shutil.rmtree(run_dir / phase_backup(number), ignore_errors=True)
        with contextlib.suppress(OSError):  # only when empty
            (run_dir / BACKUP_DIR).rmdir()
        phase_info.append(record)
        initial_epoch += epochs_run

    # The final model: the best validation loss over both phases (phase 2 may not beat phase 1).
    if best_path.exists():
        try:
            with warnings.catch_warnings():  # its optimizer state belongs to another phase
                warnings.simplefilter("ignore")
                model.load_weights(best_path)
        except (OSError, ValueError) as e:
            logger.warning("Could not read %s (%s); keeping the last weights.", best_path, e)
    # Leave the model in its intended strategy (the flags a user/exporter will inspect).
    apply_strategy(model, phases[-1]["strategy"], phases[-1]["fine_tune_at"], train_bn=train_bn)

    history, boundary = merged_history(run_dir, len(phases))
    history_out = {**history, "phase_boundary": boundary}
    if not chief:  # trained in a private copy of the run directory; the chief reports and exports
        shutil.rmtree(run_dir, ignore_errors=True)
        return RunResult(
            model=model, history=history_out, metrics={"chief": False}, run_dir=shared_run_dir
        )
    reports.write_history(history, run_dir, boundary)
    reports.plot_history(history, run_dir / reports.HISTORY_PNG, boundary, title=run_dir.name)

    metrics: dict[str, Any] = {}
    if data.test is not None:
        y_true, y_prob = _evaluate(model, data.test)
        if task == "multilabel":
            metrics.update(reports.multilabel_metrics(y_true, y_prob, class_names, from_logits))
        else:
            if from_logits:
                y_prob = np.asarray(
                    keras.ops.sigmoid(y_prob) if task == "binary" else keras.ops.softmax(y_prob)
                )
            metrics.update(reports.classification_metrics(y_true, y_prob, class_names))
            reports.plot_confusion(
                metrics["confusion_matrix"], class_names, run_dir / reports.CONFUSION_PNG
            )
        metrics["evaluated_on"] = "test"
    else:
        logger.warning("No test split: no held-out metrics in metrics.json.")
        metrics["evaluated_on"] = None
    data_dict = data.to_dict() if hasattr(data, "to_dict") else {}
    metrics.update(
        {
            "class_names": class_names,
            "counts": data_dict.get("counts"),
            "skipped": data_dict.get("skipped", []),
            "data": data_dict,
            "phases": phase_info,
            "wall_time_s": {str(p["phase"]): p["wall_time_s"] for p in phase_info},
            "trainable_params": {str(p["phase"]): p["trainable_params"] for p in phase_info},
            "run": {
                "run_dir": str(run_dir),
                "strategy": strategy,
                "fine_tune_at": fine_tune_at,
                "backbone": spec.get("backbone", spec.get("name")),
                "task": task,
                "config": config.to_dict(),
                "model": spec,
                "resumes": state.get("resumes", 0),
                "distribution": distribute.describe(strategy_tf),
            },
        }
    )
    result = RunResult(model=model, history=history_out, metrics=metrics, run_dir=run_dir)
    if _before_done is not None:
        _before_done(result)  # e.g. export: a kill before this line resumes instead of refusing
    reports.write_json(result.metrics, run_dir / reports.METRICS_JSON)
    state["status"] = "done"
    write_state(run_dir, state)
    if verbose:
        print(reports.summary_text(result.metrics))
    return result


# --------------------------------------------------------------------------------------------------
# train: the one-call entry point of scripts/train.py
# --------------------------------------------------------------------------------------------------

# The offline digits story (tlkeras.weights): a backbone pre-trained on 0-4, transferred to 5-9.
DEFAULT_DATA = weights_lib.DEFAULT_TARGET
DEFAULT_WEIGHTS = weights_lib.SOURCE_PREFIX + weights_lib.DEFAULT_SOURCE
DEFAULT_BACKBONE = weights_lib.DEFAULT_BACKBONE
# Flag text; the library itself defaults to {}.
DEFAULT_BACKBONE_KWARGS = ",".join(
    f"{k}={v}" for k, v in weights_lib.DEFAULT_BACKBONE_KWARGS.items()
)
DEFAULT_STRATEGY = FULL
DEFAULT_OUTPUT_ROOT = "runs"
DEFAULT_EXPORT_DIR = "saved_models"


def model_name_for(data_source: Any) -> str:
    """A SavedModel name from the data source: ``digits:5-9`` -> ``digits_5_9``,
    ``…/hymenoptera/train`` -> ``hymenoptera``, ``tfds:tf_flowers`` -> ``tf_flowers``."""
    if isinstance(data_source, (str, os.PathLike)):
        text = str(data_source)
        if text.startswith("tfds:"):
            text = text[5:].split(":")[0].split("/")[0]
        elif not text.startswith("digits"):
            path = Path(text).expanduser().resolve()
            text = path.parent.name if path.name in ("train", "training") else path.name
    else:
        text = "arrays"
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    return name or "model"


def _is_digits(source: Any) -> bool:
    return isinstance(source, str) and (source == "digits" or source.startswith("digits:"))


def default_fine_tune_at(
    backbone: str, input_shape: tuple[int, int, int], backbone_kwargs: dict[str, Any] | None = None
) -> int:
    """``partial`` without a block index: fine-tune the top half of the backbone's blocks.

    Counts the blocks on a weightless build (cheap: no weights are read).
    """
    probe = build_model(
        backbone, 2, weights=None, input_shape=input_shape, backbone_kwargs=backbone_kwargs
    )
    return max(1, len(blocks(probe)) // 2)


def train(
    data_source: Any = DEFAULT_DATA,
    *,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    weights: str | None = DEFAULT_WEIGHTS,
    image_size: int | tuple[int, int] | None = None,
    strategy: str = DEFAULT_STRATEGY,
    fine_tune_at: int | None = None,
    head: Any = None,
    dropout: float | None = None,
    augment: Any = None,
    train_bn: bool | None = None,
    validation_data: Any = None,
    validation_split: float = 0.2,
    test_split: float = 0.2,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    export_dir: str | Path | None = DEFAULT_EXPORT_DIR,
    model_name: str | None = None,
    overwrite: bool = False,
    distribution: Any = None,
    verbose: int = 1,
    **config_overrides: Any,
) -> RunResult:
    """Data in, trained and exported classifier out: ``load`` → ``build_model`` → :func:`fit` →
    ``tlkeras.export``.

    Args:
        data_source: anything ``tlkeras.data.load`` takes (folder, ``tfds:NAME``, ``(x, y)``,
            ``digits[:A-B]``); default: the embedded digits 5-9 (offline).
        backbone, backbone_kwargs, fine_tune_at, train_bn: as ``tlkeras.build_model``.
        weights: ``"imagenet"``, a weights file, ``None`` (random init; required by ``scratch``),
            or ``"source:TASK"`` (a backbone pre-trained on TASK by ``tlkeras.weights``; default
            ``"source:digits:0-4"``).
        image_size: training/serving size; ``None``: 32 for ``source:`` weights, else the
            backbone's default size.
        strategy: ``scratch`` | ``feature_extraction`` | ``partial`` | ``full``.
        head: a ``HeadConfig``; or ``dropout`` alone to change the default head's dropout.
        augment: an ``AugmentConfig``, ``True`` (defaults), ``False``, or ``None``: on, except for
            the digits sources (a flipped digit is another digit).
        validation_data, validation_split, test_split: as ``tlkeras.data.load``.
        config: a ``TrainConfig``; ``config_overrides`` (``epochs=3``…) apply on top of it.
        output_dir: the run directory; default ``runs/<model_name>/<strategy>``.
        export_dir: SavedModel base directory (``<export_dir>/<model_name>/<version>``); ``None``
            skips the export.
        model_name: default from the data source (``digits_5_9``, ``hymenoptera``…).
        overwrite: replace a finished run in ``output_dir``.
        distribution: ``tlkeras.distribute`` — a ``DistributeConfig``, its name (``default``,
            ``mirrored``, ``multi_worker``, ``tpu``) or a ``tf.distribute.Strategy``; ``None``:
            one device. ``batch_size`` is then per replica. Only the chief writes and exports.
    """
    config = dataclasses.replace(config or TrainConfig(), **config_overrides)
    strategy_enum = Strategy.parse(strategy)
    if strategy_enum is not Strategy.PARTIAL or fine_tune_at is not None:
        check_fine_tune_at(strategy_enum, fine_tune_at)
    if strategy_enum is Strategy.SCRATCH and weights is not None:
        raise ValueError(
            "weights: strategy 'scratch' trains from random init and expects weights=None "
            f"(--weights=none), received {weights!r}"
        )
    if head is not None and dropout is not None:
        raise ValueError("dropout: expected either head= or dropout=, received both")
    if head is None:
        head = HeadConfig() if dropout is None else HeadConfig(dropout=dropout)
    if augment is None:
        augment = not _is_digits(data_source)
    if augment is True:
        augment = AugmentConfig(seed=config.seed)
    elif augment is False:
        augment = None
    backbone_kwargs = dict(backbone_kwargs or {})
    size = weights_lib.image_size_for(image_size, weights, backbone)
    model_name = model_name or model_name_for(data_source)
    run_dir = (
        Path(output_dir)
        if output_dir
        else Path(DEFAULT_OUTPUT_ROOT) / model_name / strategy_enum.value
    )

    # First: a multi-worker or logical-CPU strategy must exist before TensorFlow starts its devices.
    if isinstance(distribution, tf.distribute.Strategy):
        strategy_tf = distribution
    else:
        strategy_tf = distribute.make_strategy(distribution)
    batch_size = distribute.global_batch_size(config.batch_size, strategy_tf)
    if verbose and distribute.is_distributed(strategy_tf):
        print(
            f"Distribution: {distribute.describe(strategy_tf)}; global batch {batch_size} "
            f"({config.batch_size} per replica)"
        )
    set_seed(config.seed)
    data = data_lib.load(
        data_source,
        validation=validation_data,
        image_size=size,
        batch_size=batch_size,
        validation_split=validation_split,
        test_split=test_split,
        seed=config.seed,
    )
    if verbose:
        print(data.summary())
    if data.multilabel and head.task != "multilabel":
        head = dataclasses.replace(head, task="multilabel")
    input_shape = (*size, 3)
    if strategy_enum is Strategy.PARTIAL and fine_tune_at is None:
        fine_tune_at = default_fine_tune_at(backbone, input_shape, backbone_kwargs)
        if verbose:
            print(
                f"partial: no fine_tune_at given; fine-tuning the top half (fine_tune_at={fine_tune_at})"
            )
    # The chief pre-trains `source:` weights into the (shared) cache before the others look there.
    multi_worker, chief = distribute.is_multi_worker(strategy_tf), distribute.is_chief(strategy_tf)
    if multi_worker and not chief:
        distribute.barrier(strategy_tf)
    resolved = weights_lib.resolve(weights, backbone, backbone_kwargs, input_shape)
    if multi_worker and chief:
        distribute.barrier(strategy_tf)
    with strategy_tf.scope():
        model = build_model(
            backbone,
            len(data.class_names),
            strategy=strategy_enum,
            fine_tune_at=fine_tune_at,
            weights=None if resolved is None else str(resolved),
            input_shape=input_shape,
            backbone_kwargs=backbone_kwargs,
            head=head,
            augment=augment,
            train_bn=train_bn,
        )

    def export_model(result: RunResult) -> None:
        if export_dir is None:
            return
        exported = savedmodel.export(
            result.model,
            model_name,
            base_dir=export_dir,
            class_names=data.class_names,
            metadata={"metrics": {"test_accuracy": result.metrics.get("accuracy")}},
        )
        result.export = exported
        result.metrics["export"] = str(exported.path)

    return fit(
        model,
        data,
        config,
        run_dir=run_dir,
        strategy=strategy_enum.value,
        fine_tune_at=fine_tune_at,
        overwrite=overwrite,
        verbose=verbose,
        _before_done=export_model,
    )


def evaluate_export(
    model_path: str | Path,
    data_source: Any,
    *,
    batch_size: int = 32,
    output_dir: str | Path | None = None,
    verbose: int = 1,
) -> dict[str, Any]:
    """Score an exported SavedModel on every image of ``data_source`` (no split).

    The model runs through its float signature (``tf.saved_model.load``; no tlkeras model code).
    Folder classes are matched to the model's labels by name, so a folder may hold a subset of the
    classes. Writes ``metrics.json`` and ``confusion.png`` to ``output_dir`` when given.
    """
    exported = load_exported(model_path)
    names = list(exported.class_names)
    if not names:
        raise ValueError(
            f"model: expected a tlkeras export with assets.extra/labels.txt, received {model_path}"
        )
    data = data_lib.load(
        data_source,
        image_size=exported.input_size,
        batch_size=batch_size,
        validation_split=0.0,
        test_split=0.0,
    )
    unknown = [c for c in data.class_names if c not in names]
    if unknown:
        raise ValueError(
            f"data: expected class folders among the model's classes {names}, received "
            f"unknown classes {unknown}"
        )
    to_model = np.array([names.index(c) for c in data.class_names])
    ys, probs = [], []
    for x, y in data.train:
        probs.append(exported.predict_pixels(x.numpy())["probabilities"])
        ys.append(to_model[np.asarray(y)])
    metrics = reports.classification_metrics(np.concatenate(ys), np.concatenate(probs), names)
    data_dict = data.to_dict()
    metrics.update(
        {
            "evaluated_on": str(data_source),
            "model": str(exported.path),
            "counts": data_dict.get("counts"),
            "skipped": data_dict.get("skipped", []),
            "data": data_dict,
        }
    )
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        reports.write_json(metrics, output_dir / reports.METRICS_JSON)
        reports.plot_confusion(
            metrics["confusion_matrix"], names, output_dir / reports.CONFUSION_PNG
        )
    if verbose:
        print(reports.summary_text(metrics))
    return metrics
