"""A run: the phases of ``tlkeras.fitting.phase`` in a resumable, never-overwritten run directory.

:func:`fit` plans the phases (``tlkeras.fitting.phase.plan_phases``: head warm-up on the frozen backbone,
then fine-tuning for ``partial``/``full``; ``scratch`` is one phase), runs each through
``tlkeras.fitting.phase.run_phase`` with the run directory's callbacks (best-model checkpoint, CSV and
TensorBoard logs, EarlyStopping, optional ReduceLROnPlateau, a two-epoch backup), keeps the best
validation loss across phases, and writes the reports and ``metrics.json`` on the test split.
:func:`train` is the one-call entry point of ``scripts/train.py``: load, build, fit, export.

Run directory (``run_dir``): every file in it, its state and the resume rules are ``tlkeras.fitting.rundir``'s
(re-running the same call after a kill resumes in the same phase and epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras.analysis import calibration
from tlkeras.analysis import tta as tta_lib
from tlkeras.analysis.calibration import expected_calibration_error
from tlkeras.data import augment as augment_lib
from tlkeras.data import sources as data_lib
from tlkeras.exports import edge, layout, savedmodel, verify
from tlkeras.exports.loading import load_exported, load_keras_model, read_images
from tlkeras.fitting import distribute, features, lr_finder, reports
from tlkeras.fitting.lr_finder import LRFinderResult
from tlkeras.fitting.phase import (  # noqa: F401  (TrainConfig re-exported: training is where users look)
    FEATURE_EXTRACTION,
    FULL,
    PARTIAL,
    LogLearningRate,
    LossNotFinite,
    Phase,
    TrainConfig,
    plan_phases,
    resolve_class_weight,
    run_phase,
)
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
from tlkeras.models import weights as weights_lib
from tlkeras.models.blocks import blocks
from tlkeras.models.builder import (
    AugmentConfig,
    HeadConfig,
    build_model,
    check_dtype_policy,
    get_spec,
)
from tlkeras.models.strategy import Strategy, apply_strategy, check_fine_tune_at
from tlkeras.models.task import encode_labels, infer, probabilities
from tlkeras.workflows import report_html

logger = logging.getLogger("tlkeras.workflows.training")


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


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow for a reproducible run."""
    keras.utils.set_random_seed(int(seed))


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
    saved = features.saved_value(run_dir / BEST_MODEL)
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
        features.SaveFullModel(
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


@dataclass
class _Run:
    """What the steps of :func:`fit` share: the resolved settings and the run directory's state."""

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
    run: _Run, number: int, phase: Phase, datasets: tuple[Any, Any], initial_epoch: int
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
        )
    except LossNotFinite:
        state["status"] = "failed"
        write_state(run_dir, state)
        raise
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
        "fast_path": result.fast_path,
        "refit": result.refit,
        "solver": result.solver,
        "done": True,
    }


def _finish_phase(run: _Run, number: int, record: dict[str, Any]) -> None:
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


def _run_phases(run: _Run) -> list[dict[str, Any]]:
    """Every phase not done yet, each starting where the last ended; the phase records."""
    task, num_classes = infer(run.model)[0], len(run.data.class_names)
    scope = run.model.distribute_strategy
    datasets = tuple(
        distribute.shard_by_data(encode_labels(ds, task, num_classes), scope)
        for ds in (run.data.train, run.data.validation)
    )
    initial_epoch, records = 0, []
    for number, phase in enumerate(run.phases, start=1):
        record = run.state["phases"].get(str(number), {})
        if not record.get("done"):
            record = _run_one_phase(run, number, phase, datasets, initial_epoch)
            _finish_phase(run, number, record)
        records.append(record)
        initial_epoch += record["epochs_run"]
    return records


def _load_best(run: _Run) -> None:
    """The final model: the best validation loss over all phases (phase 2 may not beat phase 1)."""
    best_path = run.run_dir / BEST_MODEL
    if best_path.exists():
        try:
            with warnings.catch_warnings():  # its optimizer state belongs to another phase
                warnings.simplefilter("ignore")
                run.model.load_weights(best_path)
        except (OSError, ValueError) as e:
            logger.warning("Could not read %s (%s); keeping the last weights.", best_path, e)
    # Leave the model in its intended strategy (the flags a user/exporter will inspect).
    last = run.phases[-1]
    apply_strategy(run.model, last.strategy, last.fine_tune_at, train_bn=run.train_bn)


def _predictions(model: keras.Model, data: Any, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(labels, probabilities)`` of a split in its (unshuffled) order; ``None`` without it."""
    dataset = getattr(data, split)
    if dataset is None:
        return None
    task, from_logits = infer(model)
    y_true, outputs = _evaluate(model, dataset)
    return y_true, np.asarray(probabilities(outputs, task, from_logits=from_logits))


def _test_metrics(run: _Run, test: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
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


def _calibration(
    run: _Run, test: tuple[np.ndarray, np.ndarray] | None
) -> tuple[dict[str, Any] | None, str]:
    """A temperature fit on the validation split (``tlkeras.analysis.calibration``), its ECE before/after
    there and on the test split, and the test split's reliability diagram; or why there is none."""
    task = infer(run.model)[0]
    validation = _predictions(run.model, run.data, "validation")
    if validation is None:
        return None, "Not measured: no validation split to fit a temperature on."
    try:
        fitted = calibration.calibrate(*validation, task, split="validation")
    except ValueError as e:  # e.g. every validation prediction right: no finite optimum
        return None, f"Not fitted: {e}"
    out: dict[str, Any] = {
        "temperature": fitted.temperature,
        "fit_on": f"validation ({fitted.num_examples} images)",
        "validation_ece_before": fitted.ece_before,
        "validation_ece_after": fitted.ece_after,
    }
    if test is not None:
        on_test = calibration.evaluate_temperature(*test, fitted.temperature, task, split="test")
        out.update({"test_ece_before": on_test.ece_before, "test_ece_after": on_test.ece_after})
        y, p = test
        calibration.plot_reliability(
            calibration.reliability_curve(y, p, task=task),
            calibration.reliability_curve(
                y, calibration.apply_temperature(p, fitted.temperature, task), task=task
            ),
            run.run_dir / report_html.RELIABILITY_PNG,
            labels=("test, as trained", f"test, temperature {fitted.temperature:.2f}"),
        )
    out["exported"] = "the SavedModel's probabilities are divided by this temperature (logits)"
    return out, ""


def _run_metrics(
    run: _Run, records: list[dict[str, Any]], test: tuple[np.ndarray, np.ndarray] | None
) -> dict[str, Any]:
    """``metrics.json``: held-out metrics, the data, each phase's record and the run's settings."""
    data_dict = run.data.to_dict() if hasattr(run.data, "to_dict") else {}
    scope = run.model.distribute_strategy
    fitted, why = _calibration(run, test)
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
    report: bool = True,
    _before_done=None,
) -> RunResult:
    """Train ``model`` on ``data`` in two phases; write reports and the best model to ``run_dir``.

    Re-running the same call on the same ``run_dir`` after an interruption resumes in the phase and
    epoch where it stopped. Final metrics are computed on ``data.test`` (never trained or
    early-stopped on; ``data.validation`` drives early stopping and the best checkpoint).

    A model built under a ``tf.distribute`` strategy's scope trains in that strategy (see
    ``tlkeras.fitting.distribute``): batch ``data`` by the global batch (per-replica batch × replicas);
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
        report: write ``report.html`` (``tlkeras.workflows.report_html``: top losses with Grad-CAM, TTA's
            gain, the data audit, also as ``audit.json``). The temperature (``calibration`` in
            metrics.json, fit on the validation split) is measured either way.

    Raises:
        ValueError: the loss became NaN (names the epoch and learning rate), bad settings.
        FileExistsError: ``run_dir`` holds a finished run and ``overwrite`` is False.
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, received {type(config).__name__}")
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
    run = _Run(
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
    records = _run_phases(run)
    _load_best(run)
    history, boundary = merged_history(run_dir, len(phases))
    history_out = {**history, "phase_boundary": boundary}
    if not distribute.is_chief(scope):  # trained in a private copy; the chief reports and exports
        shutil.rmtree(run_dir, ignore_errors=True)
        return RunResult(model, history_out, {"chief": False}, shared_run_dir)
    reports.write_history(history, run_dir, boundary)
    reports.plot_history(history, run_dir / reports.HISTORY_PNG, boundary, title=run_dir.name)
    test = _predictions(model, data, "test")
    result = RunResult(model, history_out, _run_metrics(run, records, test), run_dir)
    if _before_done is not None:
        _before_done(result)  # e.g. export: a kill before this line resumes instead of refusing
    if report:
        content = report_html.run_content(model, data, result.metrics, run_dir, test=test)
        if content.audit:
            result.metrics["audit"] = {
                k: content.audit[k] for k in ("leak_count", "duplicate_count", "mislabel_count")
            }
        result.metrics["report"] = str(
            report_html.write(content, run_dir / report_html.REPORT_HTML)
        )
    reports.write_json(result.metrics, run_dir / reports.METRICS_JSON)
    state["status"] = "done"
    write_state(run_dir, state)
    if verbose:
        print(reports.summary_text(result.metrics))
    return result


# --------------------------------------------------------------------------------------------------
# train: the one-call entry point of scripts/train.py
# --------------------------------------------------------------------------------------------------

# The offline digits story (tlkeras.models.weights): a backbone pre-trained on 0-4, transferred to 5-9.
DEFAULT_DATA = weights_lib.DEFAULT_TARGET
DEFAULT_WEIGHTS = weights_lib.SOURCE_PREFIX + weights_lib.DEFAULT_SOURCE
DEFAULT_BACKBONE = weights_lib.DEFAULT_BACKBONE
# Flag text; the library itself defaults to {}.
DEFAULT_BACKBONE_KWARGS = ",".join(
    f"{k}={v}" for k, v in weights_lib.DEFAULT_BACKBONE_KWARGS.items()
)
DEFAULT_STRATEGY = FULL
# A backbone pre-trained here on an embedded source task (``source:``) learnt from about 900 8x8
# scans, not from ImageNet: its features need more adapting, so its fine-tuning continues at the
# learning rate it was pre-trained with (not a tenth of the head's), longer, and halves the rate on
# plateaus. Measured on the main job (digits 0-4 -> 5-9, full, 180 test images): ImageNet's
# defaults (1e-4, 10 epochs, no augmentation) 85.0 %; 1e-3 90.6 %; 1e-3 + shifts and turns + 30
# epochs + plateaus, seeds 0-2: 95.0 / 92.8 / 96.1 %; the same at 2e-3: 98.3 / 98.3 / 97.8 %.
SOURCE_FINE_TUNING: dict[str, Any] = {
    "fine_tune_learning_rate": weights_lib.DEFAULT_LEARNING_RATE,
    "fine_tune_epochs": 30,
    "early_stopping_patience": 5,
    "reduce_lr_on_plateau": True,
}
DEFAULT_OUTPUT_ROOT = "runs"
# learning_rate=AUTO: the LR finder's suggestion (tlkeras.fitting.lr_finder), its curve and numbers here.
AUTO = "auto"
LR_FIND_PNG, LR_FIND_JSON = "lr_find.png", "lr_find.json"
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
    max_bad_fraction: float = data_lib.DataConfig.max_bad_fraction,
    config: TrainConfig | None = None,
    output_dir: str | Path | None = None,
    export_dir: str | Path | None = DEFAULT_EXPORT_DIR,
    model_name: str | None = None,
    export_formats: Sequence[str] = (edge.SAVED_MODEL,),
    overwrite: bool = False,
    distribution: Any = None,
    verbose: int = 1,
    report: bool = True,
    export_explain: bool = False,
    mixed_precision: str = "float32",
    **config_overrides: Any,
) -> RunResult:
    """Data in, trained and exported classifier out: ``load`` → ``build_model`` → :func:`fit` →
    ``tlkeras.export``.

    Args:
        data_source: anything ``tlkeras.data.load`` takes (folder, ``tfds:NAME``, ``(x, y)``,
            ``digits[:A-B]``); default: the embedded digits 5-9 (offline).
        backbone, backbone_kwargs, fine_tune_at, train_bn: as ``tlkeras.build_model``;
            ``backbone_kwargs=None`` with ``source:`` weights is the main job's (``alpha=0.25``
            for MobileNet).
        weights: ``"imagenet"``, a weights file, ``None`` (random init; required by ``scratch``),
            or ``"source:TASK"`` (a backbone pre-trained on TASK by ``tlkeras.models.weights``; default
            ``"source:digits:0-4"``).
        image_size: training/serving size (an int, ``(height, width)``), or ``"auto"``/``None``:
            chosen from the data's resolution (``tlkeras.models.weights.auto_image_size``: the size
            ``source:`` weights were pre-trained at; the backbone's default for photos; about 3x
            the short side of small images such as CIFAR's 32 px). The run prints the choice.
        strategy: ``scratch`` | ``feature_extraction`` | ``partial`` | ``full``.
        head: a ``HeadConfig``; or ``dropout`` alone to change the default head's dropout.
        augment: an ``AugmentConfig``, ``True`` (defaults), ``False``, or ``None``: on, except for
            the digits sources (a flipped digit is another digit).
        validation_data, validation_split, test_split, max_bad_fraction: as
            ``tlkeras.data.load``.
        config: a ``TrainConfig``; ``config_overrides`` (``epochs=3``…) apply on top of it.
            ``learning_rate="auto"``: the LR finder's suggestion for the first phase
            (``tlkeras.fitting.lr_finder``; ``lr_find.png``/``.json`` in the run directory,
            ``learning_rate_finder`` in metrics.json). With the default L-BFGS head it sets the
            fine-tuning rate (a tenth of it, unless ``fine_tune_learning_rate`` is given).
        output_dir: the run directory; default ``runs/<model_name>/<strategy>``.
        export_dir: SavedModel base directory (``<export_dir>/<model_name>/<version>``); ``None``
            skips the export.
        model_name: default from the data source (``digits_5_9``, ``hymenoptera``…).
        export_formats: what to write under ``export_dir``: ``saved_model`` and any of
            ``tlkeras.exports.edge.EXPORT_FORMATS`` (``tflite``, ``tflite_float16``, ``tflite_dynamic``,
            ``tflite_int8``, ``onnx``), each verified on the test split (``layout.edge_dir``);
            int8 is calibrated on training images.
        overwrite: replace a finished run in ``output_dir``.
        distribution: ``tlkeras.fitting.distribute`` — a ``DistributeConfig``, its name (``default``,
            ``mirrored``, ``multi_worker``, ``tpu``) or a ``tf.distribute.Strategy``; ``None``:
            one device. ``batch_size`` is then per replica. Only the chief writes and exports.
        report: write ``report.html`` and ``audit.json`` in the run directory (:func:`fit`).
        export_explain: add the Grad-CAM ``explain`` signature to the SavedModel
            (``tlkeras.export(explain=True)``; off by default: it makes exporting and loading
            slower).
        mixed_precision: the Keras dtype policy the model is built in (``float32``,
            ``mixed_float16``, ``mixed_bfloat16``; ``tlkeras.build_model(dtype_policy=...)``).
            The head's output and the export's inputs stay float32.
    """
    check_dtype_policy(mixed_precision)
    auto_lr = config_overrides.get("learning_rate") == AUTO
    if auto_lr:  # found below, once the data and the model exist
        config_overrides = {**config_overrides, "learning_rate": None}
    config = resolve_config(config, weights, **config_overrides)
    if isinstance(export_formats, str):
        export_formats = export_formats.split(",")
    edge.parse_export_formats(export_formats)  # refuse a bad name before training, not after
    strategy_enum = Strategy.parse(strategy)
    head, augment = _check_train_args(
        strategy_enum, fine_tune_at, weights, head, dropout, augment, data_source, config
    )
    backbone_kwargs = weights_lib.backbone_kwargs_for(backbone, backbone_kwargs, weights)
    size, why = weights_lib.choose_image_size(image_size, weights, backbone, data_source)
    if why and verbose:
        print(f"image_size=auto: {size[0]}x{size[1]} ({why})")
    model_name = model_name or model_name_for(data_source)
    run_dir = (
        Path(output_dir)
        if output_dir
        else Path(DEFAULT_OUTPUT_ROOT) / model_name / strategy_enum.value
    )
    # First: a multi-worker or logical-CPU strategy must exist before TensorFlow starts its devices.
    strategy_tf, batch_size = _tf_strategy(distribution, config, verbose)
    if export_dir is not None and distribute.is_chief(strategy_tf):
        verify.prestart_verifier()  # its TensorFlow import overlaps the training
    data, model, fine_tune_at = _load_and_build(
        data_source,
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
        weights=weights,
        size=size,
        strategy=strategy_enum,
        fine_tune_at=fine_tune_at,
        head=head,
        augment=augment,
        train_bn=train_bn,
        validation_data=validation_data,
        validation_split=validation_split,
        test_split=test_split,
        max_bad_fraction=max_bad_fraction,
        config=config,
        batch_size=batch_size,
        strategy_tf=strategy_tf,
        mixed_precision=mixed_precision,
        verbose=verbose,
    )
    finder = None
    if auto_lr:
        config, finder = _auto_learning_rate(run_dir, model, data, config, overwrite, verbose)
    result = fit(
        model,
        data,
        config,
        run_dir=run_dir,
        strategy=strategy_enum.value,
        fine_tune_at=fine_tune_at,
        overwrite=overwrite,
        verbose=verbose,
        report=report,
        _before_done=_exporter(
            export_dir, model_name, data, export_formats, verbose, explain=export_explain
        ),
    )
    if finder is not None and distribute.is_chief(strategy_tf):
        result.metrics["learning_rate_finder"] = _save_finder(finder, result.run_dir)
        reports.write_json(result.metrics, result.run_dir / reports.METRICS_JSON)
    return result


def _save_finder(finder: LRFinderResult, run_dir: Path) -> dict[str, Any]:
    finder.plot(run_dir / LR_FIND_PNG)
    record = {k: v for k, v in finder.to_dict().items() if k not in ("lrs", "losses", "raw_losses")}
    reports.write_json(finder.to_dict(), run_dir / LR_FIND_JSON)
    return record


def _auto_learning_rate(
    run_dir: Path,
    model: keras.Model,
    data: Any,
    config: TrainConfig,
    overwrite: bool,
    verbose: int,
) -> tuple[TrainConfig, LRFinderResult | None]:
    """``config`` with the LR finder's suggestion (``tlkeras.fitting.lr_finder``), and the finder's result.

    Resuming an unfinished run reuses the rate it was started with (its fingerprint): a new sweep
    could differ in the last digit, and the run directory refuses a changed configuration.
    """
    state = read_state(run_dir) if run_dir.is_dir() else None
    if not overwrite and state and state.get("status") not in ("done", "failed", "corrupt"):
        started = state.get("fingerprint", {}).get("config", {}).get("learning_rate")
        if started is not None:
            return dataclasses.replace(config, learning_rate=float(started)), None
    finder = lr_finder.find_first_phase_lr(model, data, config)
    if verbose:
        print(f"learning_rate=auto: {finder.suggestion:.3g} ({finder.rule})")
    return dataclasses.replace(config, learning_rate=finder.suggestion), finder


def _load_and_build(
    data_source: Any,
    *,
    backbone: str,
    backbone_kwargs: dict[str, Any],
    weights: Any,
    size: tuple[int, int],
    strategy: Strategy,
    fine_tune_at: int | None,
    head: HeadConfig,
    augment: AugmentConfig | None,
    train_bn: bool | None,
    validation_data: Any,
    validation_split: float,
    test_split: float,
    max_bad_fraction: float,
    config: TrainConfig,
    batch_size: int,
    strategy_tf: tf.distribute.Strategy,
    mixed_precision: str,
    verbose: int,
) -> tuple[Any, keras.Model, int | None]:
    """:func:`train`'s data and model (and ``partial``'s block when none was given)."""
    strategy_enum = strategy
    set_seed(config.seed)
    data = data_lib.load(
        data_source,
        validation=validation_data,
        image_size=size,
        batch_size=batch_size,
        validation_split=validation_split,
        test_split=test_split,
        seed=config.seed,
        max_bad_fraction=max_bad_fraction,
    )
    if verbose:
        print(data.summary())
    if data.multilabel and head.task != "multilabel":
        head = dataclasses.replace(head, task="multilabel")
    input_shape = (*size, 3)
    if strategy_enum is Strategy.PARTIAL and fine_tune_at is None:
        fine_tune_at = default_fine_tune_at(backbone, input_shape, backbone_kwargs)
        if verbose:
            print(f"partial: no fine_tune_at given; fine-tuning the top half ({fine_tune_at=})")
    resolved = _resolve_weights(
        weights, backbone, backbone_kwargs, input_shape, strategy_tf, verbose
    )
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
            dtype_policy=mixed_precision,
        )
    return data, model, fine_tune_at


def find_lr_for(
    data_source: Any = DEFAULT_DATA,
    *,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    weights: str | None = DEFAULT_WEIGHTS,
    image_size: int | tuple[int, int] | None = None,
    strategy: str = FEATURE_EXTRACTION,
    fine_tune_at: int | None = None,
    augment: Any = None,
    validation_data: Any = None,
    validation_split: float = data_lib.DataConfig.validation_split,
    test_split: float = data_lib.DataConfig.test_split,
    max_bad_fraction: float = data_lib.DataConfig.max_bad_fraction,
    config: TrainConfig | None = None,
    min_lr: float = lr_finder.DEFAULT_MIN_LR,
    max_lr: float = lr_finder.DEFAULT_MAX_LR,
    steps: int = lr_finder.DEFAULT_STEPS,
    verbose: int = 0,
) -> LRFinderResult:
    """``tlkeras.find_lr`` on the data and model :func:`train` would load and build with the same
    arguments (the same split and initial weights for the same ``config.seed``; ``augment`` as
    ``train``'s). ``config`` gives ``batch_size``, ``seed``, ``fast``, ``label_smoothing``,
    ``weight_decay``, ``optimizer``, ``layer_decay`` and ``class_weight``.
    ``scripts/find_lr.py``'s one call."""
    lr_finder.check_sweep(min_lr, max_lr, steps)  # before any data is read
    config = resolve_config(config, weights)
    strategy_enum = Strategy.parse(strategy)
    head, augment = _check_train_args(
        strategy_enum, fine_tune_at, weights, None, None, augment, data_source, config
    )
    data, model, fine_tune_at = _load_and_build(
        data_source,
        backbone=backbone,
        backbone_kwargs=weights_lib.backbone_kwargs_for(backbone, backbone_kwargs, weights),
        weights=weights,
        size=weights_lib.image_size_for(image_size, weights, backbone, data_source),
        strategy=strategy_enum,
        fine_tune_at=fine_tune_at,
        head=head,
        augment=augment,
        train_bn=None,
        validation_data=validation_data,
        validation_split=validation_split,
        test_split=test_split,
        max_bad_fraction=max_bad_fraction,
        config=config,
        batch_size=config.batch_size,
        strategy_tf=tf.distribute.get_strategy(),
        mixed_precision="float32",
        verbose=verbose,
    )
    return lr_finder.find_lr(
        model,
        data,
        strategy=strategy_enum.value,
        fine_tune_at=fine_tune_at,
        config=config,
        min_lr=min_lr,
        max_lr=max_lr,
        steps=steps,
        fast=config.fast,
        seed=config.seed,
    )


def _check_train_args(
    strategy: Strategy,
    fine_tune_at: int | None,
    weights: Any,
    head: Any,
    dropout: float | None,
    augment: Any,
    data_source: Any,
    config: TrainConfig,
) -> tuple[HeadConfig, AugmentConfig | None]:
    """Refuse contradictory arguments; ``(head, augment)`` with their defaults filled in."""
    if strategy is not Strategy.PARTIAL or fine_tune_at is not None:
        check_fine_tune_at(strategy, fine_tune_at)
    if strategy is Strategy.SCRATCH and weights is not None:
        raise ValueError(
            "weights: strategy 'scratch' trains from random init and expects weights=None "
            f"('none'), received {weights!r}"
        )
    if head is not None and dropout is not None:
        raise ValueError("dropout: expected either head= or dropout=, received both")
    if head is None:
        head = HeadConfig() if dropout is None else HeadConfig(dropout=dropout)
    return head, resolve_augment(augment, data_source, config.seed)


def resolve_config(
    config: TrainConfig | None, weights: Any, **config_overrides: Any
) -> TrainConfig:
    """:func:`train`'s configuration: ``config`` (default ``TrainConfig()``) with the overrides that
    are not ``None`` on top; with ``source:`` weights and no ``config``, ``SOURCE_FINE_TUNING``
    fills in what the overrides leave unsaid."""
    overrides = {k: v for k, v in config_overrides.items() if v is not None}
    if config is None and weights_lib.is_source(weights):
        overrides = {**SOURCE_FINE_TUNING, **overrides}
    return dataclasses.replace(config or TrainConfig(), **overrides)


# Thumbnails (median short side under this many pixels, such as CIFAR's 32 px) get flips only by
# default: rotating, zooming and re-contrasting a 32-px image upscaled to 96 held fine-tuning back
# (CIFAR-10, full, 5 epochs at 1e-4, validation accuracy from the solved head's ~0.69: light
# 0.706, none 0.735, flips only 0.720; with the cosine schedule light 0.743 at 3e-4, flips only
# 0.743 at 1e-4 and 0.763 at 3e-4), while photos keep them (ants/bees: 79.7 % without the
# augmented view, 82.9 % with it).
THUMBNAIL_SIDE = 64
THUMBNAIL_AUGMENT = AugmentConfig(rotation=0.0, zoom=0.0, contrast=0.0)


def resolve_augment(
    augment: Any, data_source: Any, seed: int = 0, *, preset: str | None = None
) -> AugmentConfig | None:
    """:func:`train`'s ``augment``: ``None`` is on (for the digits sources their own small shifts
    and turns, no flips: a flipped digit is another digit; for thumbnails, images whose median
    short side is under ``THUMBNAIL_SIDE`` px, horizontal flips only), ``True`` the defaults,
    ``False`` none, an ``AugmentConfig`` itself. ``preset`` (``AugmentConfig.preset``) replaces
    the preset of whatever is on."""
    resolution = data_lib.source_resolution(data_source) if augment is None else None
    if augment is None and data_lib.is_digits(data_source):
        augment = dataclasses.replace(weights_lib.PRETRAIN_AUGMENT, seed=seed)
    elif augment is None and resolution is not None and min(resolution) < THUMBNAIL_SIDE:
        augment = dataclasses.replace(THUMBNAIL_AUGMENT, seed=seed)
    elif augment is None or augment is True:
        augment = AugmentConfig(seed=seed)
    elif augment is False:
        return None
    return augment if preset is None else dataclasses.replace(augment, preset=preset)


def _tf_strategy(
    distribution: Any, config: TrainConfig, verbose: int
) -> tuple[tf.distribute.Strategy, int]:
    """The ``tf.distribute`` strategy of ``distribution`` and the global batch size under it."""
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
    return strategy_tf, batch_size


def _resolve_weights(
    weights: Any,
    backbone: str,
    backbone_kwargs: dict[str, Any],
    input_shape: tuple[int, int, int],
    strategy_tf: tf.distribute.Strategy,
    verbose: int = 0,
) -> str | None:
    """``weights_lib.resolve``; the chief pre-trains ``source:`` weights into the (shared) cache
    before the other workers look there."""
    multi_worker, chief = distribute.is_multi_worker(strategy_tf), distribute.is_chief(strategy_tf)
    if multi_worker and not chief:
        distribute.barrier(strategy_tf)
    resolved = weights_lib.resolve(
        weights, backbone, backbone_kwargs, input_shape, progress=verbose > 0
    )
    if multi_worker and chief:
        distribute.barrier(strategy_tf)
    return resolved


def _exporter(
    export_dir: str | Path | None,
    model_name: str,
    data: Any,
    export_formats: Sequence[str],
    verbose: int = 1,
    explain: bool = False,
):
    """What :func:`fit` calls before it marks the run done: the exports (or nothing)."""
    write_saved_model, edge_configs = edge.parse_export_formats(export_formats)

    def export_model(result: RunResult) -> None:
        if export_dir is None:
            return
        source, version = result.model, None
        calibrated = result.metrics.get("calibration")
        if write_saved_model:
            exported = savedmodel.export(
                result.model,
                model_name,
                base_dir=export_dir,
                class_names=data.class_names,
                metadata={
                    "metrics": {"test_accuracy": result.metrics.get("accuracy")},
                    "calibration": calibrated or {},
                },
                temperature=calibrated["temperature"] if calibrated else 1.0,
                explain=explain,
            )
            result.export = exported
            result.metrics["export"] = str(exported.path)
            source, version = exported.path, exported.version
        if edge_configs:
            result.edge_exports = _edge_exports(
                source, edge_configs, export_dir, model_name, version, data, verbose
            )
            result.metrics["edge_exports"] = {
                r.config.name: {"path": str(r.path), "size_bytes": r.size_bytes, **r.verification}
                for r in result.edge_exports
            }

    return export_model


def _edge_exports(
    source: Any,
    configs: list[Any],
    export_dir: str | Path,
    model_name: str,
    version: int | None,
    data: Any,
    verbose: int = 1,
) -> list[Any]:
    """Each edge format of ``source``, verified on the test split (validation when there is none;
    labels only for single-label data) and int8-calibrated on training images."""
    held_out = data.test if data.test is not None else data.validation
    images, labels = _pixels_and_labels(held_out, None) if held_out is not None else (None, None)
    calibration = None
    if any(c.quantization == "int8" for c in configs):
        calibration, _ = _pixels_and_labels(data.train, max(c.calibration_size for c in configs))
    if data.multilabel:
        labels = None
    version = version or layout.next_edge_version(export_dir, model_name)
    results = []
    for config in configs:
        out = layout.edge_dir(export_dir, model_name, version, config.name)
        results.append(
            edge.export_edge(
                source,
                out,
                config,
                class_names=data.class_names,
                images=images,
                labels=labels,
                calibration_images=calibration,
            )
        )
        v = results[-1].verification
        accuracy = f", accuracy {v['accuracy']:.1%}" if "accuracy" in v else ""
        if verbose:
            print(
                f"Exported {config.name}: {out} ({results[-1].size_bytes / 1e6:.2f} MB, top-1 "
                f"agreement {v['top1_agreement']:.1%}{accuracy})"
            )
    return results


def _pixels_and_labels(dataset: tf.data.Dataset, limit: int | None) -> tuple[np.ndarray, Any]:
    xs, ys, n = [], [], 0
    for x, y in dataset:
        xs.append(np.asarray(x, dtype="float32"))
        ys.append(np.asarray(y))
        n += len(xs[-1])
        if limit is not None and n >= limit:
            break
    return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]


def default_evaluate_dir(model_path: str | Path) -> Path:
    """``runs/evaluate/<the export's last two folders>``: ``NAME/VERSION`` for a SavedModel,
    ``VERSION/FORMAT`` for an edge export (its folder, not its model file)."""
    path = Path(model_path).resolve()
    folder = path.parent if path.is_file() else path
    return Path(DEFAULT_OUTPUT_ROOT, "evaluate", *folder.parts[-2:])


def evaluate_export(
    model_path: str | Path,
    data_source: Any,
    *,
    batch_size: int = 32,
    output_dir: str | Path | None = None,
    verbose: int = 1,
    max_bad_fraction: float = data_lib.DataConfig.max_bad_fraction,
    tta: tta_lib.TTAConfig | str | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Score an exported SavedModel on every image of ``data_source`` (no split).

    The model runs through its float signature (``tf.saved_model.load``; no tlkeras model code).
    Folder classes are matched to the model's labels by name, so a folder may hold a subset of the
    classes. Writes ``metrics.json`` and ``confusion.png`` to ``output_dir`` when given.
    ``max_bad_fraction``: as ``tlkeras.data.load``. ``tta``: score the mean over these test-time
    views (``tlkeras.analysis.tta``; client side, on the float signature); ``metrics["tta"]`` then holds the
    accuracy without and with it (one pass: the first view is the image itself).
    ``report``: with ``output_dir``, also ``report.html`` there (``tlkeras.workflows.report_html``: top
    losses with the export's Grad-CAM, calibration, TTA).
    ``metrics["expected_calibration_error"]``: top-label ECE of the scored probabilities
    (``tlkeras.analysis.calibration``; not for multi-label exports).
    """
    tta = tta_lib.check(tta)
    exported = load_exported(model_path)
    if tta is not None:
        tta_lib.refuse_baked_in(exported)
    names = list(exported.class_names)
    if not names:
        raise ValueError(
            f"model: expected a tlkeras export with assets.extra/labels.txt, received {model_path}"
        )
    data, to_model = _load_labelled(
        data_source,
        names,
        exported.input_size,
        batch_size=batch_size,
        max_bad_fraction=max_bad_fraction,
    )
    ys, probs, plain = [], [], []
    for x, y in data.ordered("train"):  # in ``data.items`` order, for the report
        per_view = tta_lib.view_probabilities(
            lambda v: exported.predict_pixels(v)["probabilities"], x.numpy(), tta
        )
        plain.append(per_view[0])
        probs.append(tta_lib.average(per_view))
        ys.append(to_model[np.asarray(y)])
    y_true, y_prob = np.concatenate(ys), np.concatenate(probs)
    metrics = reports.classification_metrics(y_true, y_prob, names)
    if exported.metadata.get("task") != "multilabel":
        metrics["expected_calibration_error"] = expected_calibration_error(y_true, y_prob)
    if tta is not None:
        without = reports.classification_metrics(y_true, np.concatenate(plain), names)["accuracy"]
        metrics["tta"] = {
            **tta.to_dict(),
            "accuracy_without": without,
            "accuracy_with": metrics["accuracy"],
            "gain": metrics["accuracy"] - without,
        }
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
        if report:
            content = report_html.export_content(
                exported, data, metrics, (y_true, y_prob), output_dir
            )
            metrics["report"] = str(
                report_html.write(content, output_dir / report_html.REPORT_HTML)
            )
    if verbose:
        print(reports.summary_text(metrics))
        if tta is not None:
            t = metrics["tta"]
            print(
                f"test-time augmentation ({t['spec']}, {len(t['views'])} views): accuracy "
                f"{t['accuracy_without']:.4f} without, {t['accuracy_with']:.4f} with "
                f"({100 * t['gain']:+.1f} points)"
            )
    return metrics


def report_run(run_dir: str | Path, data_source: Any = None, *, audit: bool = True) -> Path:
    """Rebuild ``report.html`` of a finished run from its directory: ``model.keras``,
    ``metrics.json``, and the data loaded again as the run loaded it (``ImageData.origin``, so the
    same split) — or from ``data_source`` with the same split settings. Returns the page's path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / reports.METRICS_JSON
    if not metrics_path.is_file() or not (run_dir / BEST_MODEL).is_file():
        raise FileNotFoundError(
            f"run_dir: expected a finished run directory with {reports.METRICS_JSON} and "
            f"{BEST_MODEL}, received {str(run_dir)!r}"
        )
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    origin = (metrics.get("data") or {}).get("origin")
    if origin is None and data_source is None:
        raise ValueError(
            f"data: the run in {str(run_dir)!r} was trained on in-memory arrays (or before data "
            "origins were recorded); expected the data given again (--data)"
        )
    origin = origin or {"validation": None, "config": {}}
    data = data_lib.load(
        data_source if data_source is not None else origin["source"],
        validation=origin["validation"],
        config=data_lib.DataConfig(**origin["config"]),
    )
    model = keras.saving.load_model(run_dir / BEST_MODEL)
    test = _predictions(model, data, "test")
    content = report_html.run_content(model, data, metrics, run_dir, test=test, audit=audit)
    return report_html.write(content, run_dir / report_html.REPORT_HTML)


def labelled_pixels(
    folder: Any,
    class_names: Sequence[str],
    image_size: tuple[int, int],
    limit: int | None = None,
    max_bad_fraction: float = data_lib.DataConfig.max_bad_fraction,
) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a labelled folder (one subfolder per class, a subset of ``class_names``)
    decoded as training decodes it, with its index in ``class_names``; bad files skipped (up to
    ``max_bad_fraction``, as ``tlkeras.data.load``)."""
    data, to_model = _load_labelled(
        folder, list(class_names), image_size, max_bad_fraction=max_bad_fraction
    )
    pixels, labels = _pixels_and_labels(data.train, limit)
    return pixels, to_model[labels]


def _load_labelled(
    data_source: Any, names: list[str], image_size: tuple[int, int], **load_kwargs: Any
) -> tuple[Any, np.ndarray]:
    """All of ``data_source`` (no split) and, per class of it, that class's index in the model's
    ``names``: folders may hold a subset of the model's classes, none outside them."""
    data = data_lib.load(
        data_source, image_size=image_size, validation_split=0.0, test_split=0.0, **load_kwargs
    )
    unknown = [c for c in data.class_names if c not in names]
    if unknown:
        raise ValueError(
            f"data: expected class folders among the model's classes {names}, received "
            f"unknown classes {unknown}"
        )
    return data, np.array([names.index(c) for c in data.class_names])


def export_edge_files(
    model: str | Path,
    config: Any,
    *,
    out_dir: str | Path | None = None,
    base_dir: str | Path = savedmodel.DEFAULT_BASE_DIR,
    model_name: str | None = None,
    class_names: Sequence[str] | None = None,
    images: Sequence[str | Path] = (),
    eval_data: Any = None,
    calibration_data: Any = None,
    max_images: int | None = None,
    overwrite: bool = False,
    max_bad_fraction: float = data_lib.DataConfig.max_bad_fraction,
) -> Any:
    """``scripts/export.py --format=tflite|onnx``: ``model`` is a SavedModel (version or base
    directory), a ``.keras`` file or a run directory; verified on ``eval_data`` (labelled folder:
    accuracy too; every image) or ``images`` (files/folders, at most ``max_images``),
    int8-calibrated on ``calibration_data`` (both folders loaded with ``max_bad_fraction``). The
    default ``out_dir`` is ``layout.edge_dir`` of the model's name and version."""
    path = Path(model)
    version = None
    if path.is_dir() and not (path / "model.keras").is_file():  # a run directory holds model.keras
        version_dir = layout.resolve_version_dir(path)
        source: Any = version_dir
        loaded = load_exported(version_dir)
        names, size = list(class_names or loaded.class_names), loaded.input_size
        version = loaded.version
        model_name = model_name or (version_dir.parent.name if version else version_dir.name)
    else:
        source, names = load_keras_model(path, class_names)
        size = tuple(int(d) for d in source.inputs[0].shape[1:3])
        model_name = model_name or (path.parent.name if path.is_file() else path.name)
    pixels = labels = calibration = None
    if eval_data is not None:
        pixels, labels = labelled_pixels(eval_data, names, size, max_bad_fraction=max_bad_fraction)
    elif images:
        pixels = read_images(images, limit=max_images)
    if calibration_data is not None:
        calibration, _ = _pixels_and_labels(
            data_lib.load(
                calibration_data,
                image_size=size,
                validation_split=0.0,
                test_split=0.0,
                max_bad_fraction=max_bad_fraction,
            ).train,
            config.calibration_size,
        )
    if out_dir is None:
        version = version or layout.next_edge_version(base_dir, model_name)
        out_dir = layout.edge_dir(base_dir, model_name, version, config.name)
    return edge.export_edge(
        source,
        out_dir,
        config,
        class_names=names,
        images=pixels,
        labels=labels,
        calibration_images=calibration,
        overwrite=overwrite,
    )
