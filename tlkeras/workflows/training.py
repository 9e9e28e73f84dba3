"""``fit`` and ``train``: what ``scripts/train.py`` (and ``tlkeras.fit``/``tlkeras.train``) call.

:func:`fit` is the run of phases (``tlkeras.fitting.run``: a resumable, never-overwritten run
directory) followed by the temperature fit on the validation split (``tlkeras.analysis.calibration``)
and ``report.html`` (``tlkeras.workflows.report_html``). :func:`train` is the one-call entry point
of ``scripts/train.py``: load, build (``tlkeras.fitting.loading``), fit, export
(``tlkeras.workflows.export_run``); :func:`find_lr_for` is ``scripts/find_lr.py``'s.

Run directory (``run_dir``): every file in it, its state and the resume rules are
``tlkeras.fitting.rundir``'s (re-running the same call after a kill resumes in the same phase and
epoch).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import data as data_lib
from tlkeras import progress
from tlkeras.analysis import calibration
from tlkeras.exports import edge, verify
from tlkeras.fitting import distribute, fast_path, head_solver, lr_finder, reports
from tlkeras.fitting import run as run_lib
from tlkeras.fitting.config import (  # noqa: F401  (TrainConfig re-exported: training is where users look)
    FEATURE_EXTRACTION,
    FULL,
    TrainConfig,
)
from tlkeras.fitting.evaluation import predictions_and_features
from tlkeras.fitting.loading import DataRequest, ModelRequest, load_and_build
from tlkeras.fitting.lr_finder import LRFinderResult
from tlkeras.fitting.run import DEFAULT_OUTPUT_ROOT, RunResult, set_seed
from tlkeras.fitting.rundir import read_state
from tlkeras.models import weights as weights_lib
from tlkeras.models.builder import AugmentConfig, HeadConfig, check_dtype_policy
from tlkeras.models.strategy import Strategy, check_fine_tune_at
from tlkeras.models.task import infer
from tlkeras.workflows import report_content, report_html
from tlkeras.workflows.export_run import exporter

# --------------------------------------------------------------------------------------------------
# fit: the phases of one run, then its calibration and report
# --------------------------------------------------------------------------------------------------


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
    if not progress.running():  # train() began it before loading the data
        progress.begin_run(quiet=not verbose)
    run, result = run_lib.fit_phases(
        model,
        data,
        config,
        run_dir=run_dir,
        strategy=strategy,
        fine_tune_at=fine_tune_at,
        overwrite=overwrite,
        verbose=verbose,
    )
    if run is None:  # a non-chief worker: it trained in a private copy
        progress.end_run()
        return result
    # One forward pass per held-out split gives its predictions and the pooled features the
    # report's data audit would otherwise compute again.
    held_out = {s: predictions_and_features(model, data, s) for s in ("validation", "test")}
    test = held_out["test"][:2] if held_out["test"] else None
    validation = held_out["validation"][:2] if held_out["validation"] else None
    with progress.step("calibration"):
        calibrated = _calibration(run, validation, test)
    result.metrics = run_lib.run_metrics(run, test, calibrated)
    # e.g. the export: a kill before the run is marked done resumes instead of refusing. It
    # returns what completes it (the SavedModel's verification runs while the report is written).
    complete = _before_done(result) if _before_done is not None else None
    try:
        if report:
            _write_report(run, result, test, _audit_features(model, held_out))
    except BaseException:
        getattr(complete, "cancel", lambda: None)()
        raise
    if callable(complete):
        complete()
    result.metrics["timings"] = progress.end_run()
    run_lib.finish(run, result)
    return result


def _write_report(
    run: run_lib.Run,
    result: RunResult,
    test: tuple[np.ndarray, np.ndarray] | None,
    features: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    """``report.html`` (and ``audit.json``) in the run directory; the audit's counts and the
    report's path into ``result.metrics``."""
    with progress.step("report", "Report: Grad-CAM of the top losses, TTA, the data audit"):
        content = report_content.run_content(
            run.model, run.data, result.metrics, run.run_dir, test=test, features=features
        )
        if content.audit:
            result.metrics["audit"] = {
                k: content.audit[k]
                for k in ("leak_count", "duplicate_count", "mislabel_count", "sampled")
                if k in content.audit
            }
        result.metrics["report"] = str(
            report_html.write(content, run.run_dir / report_html.REPORT_HTML)
        )


def _audit_features(
    model: keras.Model, held_out: dict[str, Any]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (pooled features, labels)}`` the run already computed: the held-out splits'
    from their evaluation, the training split's from the fast path's cache (a frozen backbone)."""
    out = {s: (f[2], f[0]) for s, f in held_out.items() if f and f[2] is not None}
    cached = fast_path.pooled_features(model)
    if cached is not None:
        x, encoded = cached
        multilabel = infer(model)[0] == "multilabel"
        out["train"] = (x, encoded if multilabel else head_solver.class_ids(encoded))
    return out


def _calibration(
    run: run_lib.Run,
    validation: tuple[np.ndarray, np.ndarray] | None,
    test: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[dict[str, Any] | None, str]:
    """A temperature fit on the validation predictions (``tlkeras.analysis.calibration``), its ECE
    before/after there and on the test split, and the test split's reliability diagram; or why
    there is none."""
    task = infer(run.model)[0]
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
            run.run_dir / report_content.RELIABILITY_PNG,
            labels=("test, as trained", f"test, temperature {fitted.temperature:.2f}"),
        )
    out["exported"] = "the SavedModel's probabilities are divided by this temperature (logits)"
    return out, ""


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
            or ``"source:TASK"`` (a backbone pre-trained on TASK by ``tlkeras.fitting.pretrain``; default
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
    progress.begin_run(quiet=not verbose)
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
    size, why = data_lib.choose_image_size(image_size, weights, backbone, data_source)
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
    set_seed(config.seed)
    loaded = load_and_build(
        ModelRequest(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            weights=weights,
            image_size=size,
            strategy=strategy_enum,
            fine_tune_at=fine_tune_at,
            head=head,
            augment=augment,
            train_bn=train_bn,
            dtype_policy=mixed_precision,
        ),
        DataRequest(
            data_source,
            validation=validation_data,
            validation_split=validation_split,
            test_split=test_split,
            max_bad_fraction=max_bad_fraction,
            batch_size=batch_size,
            seed=config.seed,
        ),
        scope=strategy_tf,
        verbose=verbose,
    )
    data, model, fine_tune_at = loaded.data, loaded.model, loaded.fine_tune_at
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
        _before_done=exporter(
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
    set_seed(config.seed)
    loaded = load_and_build(
        ModelRequest(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            weights=weights,
            image_size=image_size,
            strategy=strategy_enum,
            fine_tune_at=fine_tune_at,
            head=head,
            augment=augment,
        ),
        DataRequest(
            data_source,
            validation=validation_data,
            validation_split=validation_split,
            test_split=test_split,
            max_bad_fraction=max_bad_fraction,
            batch_size=config.batch_size,
            seed=config.seed,
        ),
        verbose=verbose,
    )
    data, model, fine_tune_at = loaded.data, loaded.model, loaded.fine_tune_at
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
