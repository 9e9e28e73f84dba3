"""A run: the phases of ``tlkeras.fitting.runner`` in a resumable, never-overwritten run directory.

:func:`fit_phases` plans the phases (``tlkeras.fitting.plan.plan_phases``: head warm-up on the
frozen backbone, then fine-tuning for ``partial``/``full``; ``scratch`` is one phase), runs each
through ``tlkeras.fitting.runner.run_phase`` with the run directory's callbacks (best-model
checkpoint, CSV and TensorBoard logs, EarlyStopping, optional ReduceLROnPlateau, a two-epoch
backup), keeps the best validation loss across phases and writes the history. :func:`run_metrics`
is ``metrics.json`` on the test split and :func:`finish` marks the run done.
``tlkeras.workflows.training.fit`` (``tlkeras.fit``) runs these with the calibration and the report.

Run directory (``run_dir``): every file in it, its state and the resume rules are
``tlkeras.fitting.rundir``'s (re-running the same call after a kill resumes in the same phase and
epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import checks
from tlkeras.data import augment as augment_lib
from tlkeras.fitting import distribute, fast_path, reports
from tlkeras.fitting.config import (
    FULL,
    PARTIAL,
    Phase,
    TrainConfig,
    resolve_class_weight,
    set_seed,
)
from tlkeras.fitting.plan import plan_phases
from tlkeras.fitting.rundir import (
    BACKUP_DIR,
    BEST_MODEL,
    check_run_dir,
    kept_weights,
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
from tlkeras.fitting.runner import LogLearningRate, LossNotFinite, run_phase
from tlkeras.models.blocks import blocks
from tlkeras.models.builder import AugmentConfig, get_spec
from tlkeras.models.strategy import Strategy, apply_strategy
from tlkeras.models.task import encode_labels, infer

logger = logging.getLogger("tlkeras.fitting.run")

# Where run directories go by default (``runs/<model>/<strategy>``, ``runs/evaluate/…``).
DEFAULT_OUTPUT_ROOT = "runs"


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


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
        edge_exports: the ``tlkeras.EdgeExportResult`` of each edge format :func:`train` wrote.
    """

    model: keras.Model
    history: dict[str, Any]
    metrics: dict[str, Any]
    run_dir: Path
    export: Any = None
    edge_exports: list[Any] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The run directory's callbacks
# --------------------------------------------------------------------------------------------------


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


def _tensorboard_available() -> bool:
    # tf.summary needs the separate `tensorboard` package, which TensorFlow no longer pulls in.
    return importlib.util.find_spec("tensorboard") is not None


def _best_so_far(run_dir: Path, number: int, monitor: str) -> float | None:
    """The monitored value of the saved best model (a resumed phase must beat it to save)."""
    if not (run_dir / BEST_MODEL).is_file():
        return None  # nothing saved yet (a deferred save may have died with its process)
    saved = fast_path.saved_value(run_dir / BEST_MODEL)
    if saved is not None:
        return saved
    # No record of the saved value (refit model, or an older run directory): the logs' best.
    return min(
        (
            r[monitor]
            for p in range(1, number + 1)
            for r in read_phase_csv(run_dir / phase_csv(p))
            if monitor in r and math.isfinite(r[monitor])
        ),
        default=None,
    )


def _callbacks(
    model: keras.Model,
    run_dir: Path,
    number: int,
    config: TrainConfig,
    *,
    monitor: str,
    validation: bool,
    verbose: int,
) -> tuple[list[keras.callbacks.Callback], _BackupAndRestore]:
    """Phase ``number``'s callbacks: guards, the best-model checkpoint, logs, and the backup."""
    callbacks: list[keras.callbacks.Callback] = [
        LogLearningRate(),
        keras.callbacks.TerminateOnNaN(),
    ]
    if config.early_stopping_patience > 0 and validation:
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
    callbacks.append(
        fast_path.SaveFullModel(
            model,
            str(run_dir / BEST_MODEL),
            monitor=monitor,
            save_best_only=True,
            initial_value_threshold=_best_so_far(run_dir, number, monitor),
        )
    )
    if _tensorboard_available():
        tensorboard = str(run_dir / phase_tensorboard(number))
        callbacks.append(keras.callbacks.TensorBoard(tensorboard, write_graph=False))
    elif number == 1 and verbose:
        print("TensorBoard logs off: the `tensorboard` package is not installed")
    backup = _BackupAndRestore(str(run_dir / phase_backup(number)))
    callbacks += [
        keras.callbacks.CSVLogger(str(run_dir / phase_csv(number)), append=True),
        backup,  # last: an epoch is logged before it is backed up
    ]
    return callbacks, backup


# --------------------------------------------------------------------------------------------------
# fit: the phases of one run, in a resumable run directory
# --------------------------------------------------------------------------------------------------


def _model_description(model: keras.Model) -> dict[str, Any]:
    try:
        return get_spec(model).to_dict()
    except (ValueError, AttributeError, KeyError):
        return {"name": model.name, "params": int(model.count_params())}


@dataclass
class Run:
    """What the steps of a run share: the resolved settings and the run directory's state."""

    model: keras.Model
    data: Any
    config: TrainConfig
    spec: dict[str, Any]
    strategy: str
    fine_tune_at: int | None
    phases: list[Phase]
    run_dir: Path
    shared_run_dir: Path  # what the caller named; a non-chief worker trains in a copy of it
    state: dict[str, Any]
    class_weight: dict[int, float] | None
    verbose: int
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # once run
    best_in_memory: bool = False  # the last phase saved the model as it is now (its refit)

    def __post_init__(self) -> None:
        # Phases an earlier process finished: the next phase starts from their saved weights.
        self.done_before = {int(k) for k, v in self.state["phases"].items() if v.get("done")}

    @property
    def monitor(self) -> str:
        return "val_loss" if self.data.validation is not None else "loss"

    @property
    def train_bn(self) -> bool:
        return bool(self.spec.get("train_bn", False))

    @property
    def mix(self) -> Any:
        """MixUp/CutMix of the training batches when the model's augmentation preset asks."""
        augment_spec = self.spec.get("augment")
        if not augment_spec:
            return None
        return augment_lib.batch_mixer(AugmentConfig(**augment_spec), infer(self.model)[0])


def _resolve_strategy(
    model: keras.Model, strategy: str | None, fine_tune_at: int | None
) -> tuple[dict[str, Any], str, int | None]:
    spec = _model_description(model)
    strategy = Strategy.parse(strategy or spec.get("strategy") or FULL).value
    if fine_tune_at is None and strategy == PARTIAL:
        fine_tune_at = spec.get("fine_tune_at")
    if fine_tune_at is not None and strategy != PARTIAL:
        raise ValueError(
            f"fine_tune_at: expected None unless strategy='partial', received {fine_tune_at} with "
            f"strategy={strategy!r}"
        )
    return spec, strategy, fine_tune_at


def _open_run_dir(
    run_dir: Path, fingerprint: dict[str, Any], scope: tf.distribute.Strategy, overwrite: bool
) -> tuple[Path, dict[str, Any]]:
    """``(the directory this process trains in, its state)``, created or resumed."""
    if not distribute.is_multi_worker(scope):
        return run_dir, prepare_run_dir(run_dir, fingerprint, overwrite=overwrite)
    # Every worker checks (and raises) before the chief writes; then the others copy the
    # chief's run directory and work in that copy: the same resume point, no shared writes.
    check_run_dir(run_dir, normal_fingerprint(fingerprint), overwrite=overwrite)
    distribute.barrier(scope)
    if distribute.is_chief(scope):
        prepare_run_dir(run_dir, fingerprint, overwrite=overwrite)
    distribute.barrier(scope)
    if not distribute.is_chief(scope):
        run_dir = distribute.worker_copy(run_dir, scope)
    return run_dir, read_state(run_dir)


def _run_one_phase(
    run: Run,
    number: int,
    phase: Phase,
    datasets: tuple[Any, Any],
    initial_epoch: int,
    ordered_train: Any = None,
) -> dict[str, Any]:
    """Phase ``number`` (1-based) of ``run`` from its backup or start; returns its record."""
    model, run_dir, state = run.model, run.run_dir, run.state
    if number - 1 in run.done_before:
        # Resuming: phase N starts from the end of phase N-1, finished by an earlier process.
        with warnings.catch_warnings():  # the file's optimizer state is phase N-1's
            warnings.simplefilter("ignore")
            model.load_weights(run_dir / phase_weights(number - 1))
    callbacks, backup = _callbacks(
        model,
        run_dir,
        number,
        run.config,
        monitor=run.monitor,
        validation=run.data.validation is not None,
        verbose=run.verbose,
    )
    try:
        result = run_phase(
            model,
            phase,
            *datasets,
            callbacks=callbacks,
            label_smoothing=run.config.label_smoothing,
            class_weight=run.class_weight,
            initial_epoch=initial_epoch,
            train_bn=run.train_bn,
            seed=run.config.seed,
            title=f"Phase {number}/{len(run.phases)} ({phase.name})",
            run_dir=run.shared_run_dir,
            verbose=run.verbose,
            mix=run.mix,
            ordered_train=ordered_train,
        )
    except LossNotFinite:
        state["status"] = "failed"
        write_state(run_dir, state)
        raise
    run.best_in_memory = bool(result.refit)
    if result.refit:
        # The refit model is the final one (it has no held-out validation loss of its own).
        model.save(run_dir / BEST_MODEL, overwrite=True)
        Path(f"{run_dir / BEST_MODEL}.json").unlink(missing_ok=True)
    rows = read_phase_csv(run_dir / phase_csv(number))
    earlier = state["phases"].get(str(number), {})
    return {
        "phase": number,
        "name": phase.name,
        "strategy": phase.strategy,
        "fine_tune_at": phase.fine_tune_at,
        "learning_rate": phase.learning_rate,
        "optimizer": phase.optimizer_name,
        "layer_decay": phase.layer_decay,
        "schedule": phase.schedule,
        "ema": phase.ema,
        "epochs_planned": phase.epochs,
        "epochs_run": len(rows) if rows else result.epochs_run,
        "first_epoch": initial_epoch,
        "resumed_at_epoch": backup.restored_epoch,
        "trainable_params": result.trainable_params,
        "wall_time_s": float(earlier.get("wall_time_s", 0.0)) + result.seconds,
        "epoch_seconds": list(earlier.get("epoch_seconds", [])) + result.epoch_seconds,
        "fast_path": result.fast_path,
        "refit": result.refit,
        "solver": result.solver,
        "done": True,
    }


def _finish_phase(run: Run, number: int, record: dict[str, Any]) -> None:
    """Save phase ``number``'s weights atomically, mark it done, drop its backup."""
    run_dir = run.run_dir
    tmp_weights = run_dir / f"phase{number}.tmp.weights.h5"
    run.model.save_weights(tmp_weights)
    os.replace(tmp_weights, run_dir / phase_weights(number))
    run.state["phases"][str(number)] = record
    write_state(run_dir, run.state)
    shutil.rmtree(run_dir / phase_backup(number), ignore_errors=True)
    with contextlib.suppress(OSError):  # only when empty
        (run_dir / BACKUP_DIR).rmdir()


def _run_phases(run: Run) -> list[dict[str, Any]]:
    """Every phase not done yet, each starting where the last ended; the phase records."""
    task, num_classes = infer(run.model)[0], len(run.data.class_names)
    scope = run.model.distribute_strategy
    datasets = tuple(
        distribute.shard_by_data(encode_labels(ds, task, num_classes), scope)
        for ds in (run.data.train, run.data.validation)
    )
    # The fast path (off under tf.distribute) caches from the unshuffled split: its features then
    # line up with ImageData.items, and the report's audit reuses them.
    ordered = None
    if not distribute.is_distributed(scope):
        with contextlib.suppress(AttributeError, ValueError):  # an ImageData not from load()
            ordered = encode_labels(run.data.ordered("train"), task, num_classes)
    initial_epoch, records = 0, []
    for number, phase in enumerate(run.phases, start=1):
        record = run.state["phases"].get(str(number), {})
        if not record.get("done"):
            record = _run_one_phase(run, number, phase, datasets, initial_epoch, ordered)
            _finish_phase(run, number, record)
        records.append(record)
        initial_epoch += record["epochs_run"]
    return records


def _load_best(run: Run) -> None:
    """The final model: the best validation loss over all phases (phase 2 may not beat phase 1)."""
    best_path = run.run_dir / BEST_MODEL
    if best_path.exists() and not run.best_in_memory:  # else the file holds these very weights
        try:
            with warnings.catch_warnings():  # its optimizer state belongs to another phase
                warnings.simplefilter("ignore")
                run.model.load_weights(best_path)
        except (OSError, ValueError) as e:
            logger.warning("Could not read %s (%s); keeping the last weights.", best_path, e)
    # Leave the model in its intended strategy (the flags a user/exporter will inspect).
    last = run.phases[-1]
    apply_strategy(run.model, last.strategy, last.fine_tune_at, train_bn=run.train_bn)


def _test_metrics(run: Run, test: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """Metrics on ``data.test`` (never trained or early-stopped on), plus the confusion plot."""
    if test is None:
        logger.warning("No test split: no held-out metrics in metrics.json.")
        return {"evaluated_on": None}
    task = infer(run.model)[0]
    class_names = list(run.data.class_names)
    y_true, y_prob = test
    if task == "multilabel":
        metrics = reports.multilabel_metrics(y_true, y_prob, class_names)
    else:
        metrics = reports.classification_metrics(y_true, y_prob, class_names)
        reports.plot_confusion(
            metrics["confusion_matrix"], class_names, run.run_dir / reports.CONFUSION_PNG
        )
    return {**metrics, "evaluated_on": "test"}


def run_metrics(
    run: Run,
    test: tuple[np.ndarray, np.ndarray] | None,
    calibration: tuple[dict[str, Any] | None, str] = (None, ""),
) -> dict[str, Any]:
    """``metrics.json``: held-out metrics, the data, each phase's record and the run's settings;
    ``calibration``: the temperature's record or ``None``, and why there is none."""
    records = run.records
    data_dict = run.data.to_dict() if hasattr(run.data, "to_dict") else {}
    scope = run.model.distribute_strategy
    fitted, why = calibration
    kept = kept_weights(run.run_dir, [p.name for p in run.phases], run.monitor)
    if kept and kept.get("note"):
        logger.warning("%s", kept["note"])
    return {
        **_test_metrics(run, test),
        "kept": kept,
        "calibration": fitted,
        **({"calibration_note": why} if why else {}),
        "class_names": list(run.data.class_names),
        "counts": data_dict.get("counts"),
        "skipped": data_dict.get("skipped", []),
        "data": data_dict,
        "phases": records,
        "wall_time_s": {str(p["phase"]): p["wall_time_s"] for p in records},
        "trainable_params": {str(p["phase"]): p["trainable_params"] for p in records},
        "run": {
            "run_dir": str(run.run_dir),
            "strategy": run.strategy,
            "fine_tune_at": run.fine_tune_at,
            "backbone": run.spec.get("backbone", run.spec.get("name")),
            "task": infer(run.model)[0],
            "config": run.config.to_dict(),
            "model": run.spec,
            "resumes": run.state.get("resumes", 0),
            "distribution": distribute.describe(scope),
        },
    }


# --------------------------------------------------------------------------------------------------
# The run of phases, start to finish
# --------------------------------------------------------------------------------------------------


def fit_phases(
    model: keras.Model,
    data: Any,
    config: TrainConfig | None = None,
    *,
    run_dir: str | Path,
    strategy: str | None = None,
    fine_tune_at: int | None = None,
    overwrite: bool = False,
    verbose: int = 1,
) -> tuple[Run | None, RunResult]:
    """Every phase of ``model`` on ``data`` not done yet in ``run_dir``, the best weights loaded
    and the history written: ``(the run, its result without metrics)``. A non-chief worker gets
    ``(None, its final result)`` (it trained in a private copy; the chief reports and exports).
    Arguments and errors: ``tlkeras.workflows.training.fit``'s."""
    config = config or TrainConfig()
    checks.instance("config", config, TrainConfig, "a TrainConfig")
    spec, strategy, fine_tune_at = _resolve_strategy(model, strategy, fine_tune_at)
    if data.validation is None:
        logger.warning("No validation split: early stopping and checkpoints monitor training loss.")
    class_weight = resolve_class_weight(
        config, data, infer(model)[0]
    )  # fails before any file is made
    phases = plan_phases(strategy, fine_tune_at, config, num_blocks=len(blocks(model)))
    scope = model.distribute_strategy  # the tf.distribute strategy the model was built in
    fingerprint = {
        "config": config.to_dict(),
        "strategy": strategy,
        "fine_tune_at": fine_tune_at,
        "model": spec,
        "class_names": list(data.class_names),
        "source": str(getattr(data, "source", "")),
    }
    shared_run_dir = Path(run_dir)
    run_dir, state = _open_run_dir(shared_run_dir, fingerprint, scope, overwrite)
    distribute.sync_from_chief(model, scope)  # weights loaded per worker may differ
    set_seed(config.seed)
    run = Run(
        model,
        data,
        config,
        spec,
        strategy,
        fine_tune_at,
        phases,
        run_dir,
        shared_run_dir,
        state,
        class_weight,
        verbose,
    )
    result = _phases_and_history(run)
    return (run if distribute.is_chief(scope) else None), result


def _phases_and_history(run: Run) -> RunResult:
    """:func:`fit_phases` once the run directory is open: the phases, the best weights, the
    history (written by the chief; a non-chief worker's copy removed)."""
    model, run_dir = run.model, run.run_dir
    run.records = _run_phases(run)
    _load_best(run)
    history, boundary = merged_history(run_dir, len(run.phases))
    history_out = {**history, "phase_boundary": boundary}
    if not distribute.is_chief(model.distribute_strategy):  # trained in a private copy
        shutil.rmtree(run_dir, ignore_errors=True)
        return RunResult(model, history_out, {"chief": False}, run.shared_run_dir)
    reports.write_history(history, run_dir, boundary)
    reports.plot_history(history, run_dir / reports.HISTORY_PNG, boundary, title=run_dir.name)
    return RunResult(model, history_out, {}, run_dir)


def finish(run: Run, result: RunResult) -> None:
    """Write ``metrics.json``, mark the run done, print its summary when ``verbose``."""
    reports.write_json(result.metrics, run.run_dir / reports.METRICS_JSON)
    run.state["status"] = "done"
    write_state(run.run_dir, run.state)
    if run.verbose:
        print(reports.summary_text(result.metrics))
