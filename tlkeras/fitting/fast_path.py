"""The fast frozen path's trainer: train only what trains, on features the frozen prefix computes once.

``fit_frozen`` cuts a model at its frozen prefix (``tlkeras.fitting.frozen``), caches the prefix's
outputs (``tlkeras.fitting.feature_cache``) and trains the suffix on them, leaving the trained
weights in the full Functional model; a linear head on the whole frozen backbone may instead be
solved (``tlkeras.fitting.head_solver``), and what trained may be refit on train + validation for
the best epoch count (``best_epochs``). ``SaveFullModel`` checkpoints the full model while the
suffix trains. The mode that ran is logged and returned (``history.fast_path``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import checks, progress
from tlkeras.fitting import head_solver
from tlkeras.fitting.compiling import CompileArgs, compile_model
from tlkeras.fitting.feature_cache import (
    CachedArrays,
    batch_size_of,
    cache_features,
    feature_arrays,
)
from tlkeras.fitting.frozen import (
    AUGMENTATION_LAYER,
    MODE_CACHED_VIEWS,
    FastPathPlan,
    fast_path_plan,
    split_at_block,
)
from tlkeras.models.task import infer

logger = logging.getLogger(__name__)

# model -> (pooled clean features, encoded labels) of the training data its last fast fit cached
# with ``keep_features``; dropped when a phase starts (``forget_features``): a trained backbone
# changes them.
_POOLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pooled_features(model: keras.Model) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``pool`` outputs (clean view) and encoded labels of the training data the fast path
    cached for ``model`` with ``keep_features``, in the order of the dataset it was given; ``None``
    when it kept none, or a phase has started since."""
    return _POOLED.get(model)


def forget_features(model: keras.Model) -> None:
    """Drop what :func:`pooled_features` holds for ``model`` (its backbone is about to train)."""
    _POOLED.pop(model, None)


class SaveFullModel(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that saves the full model while ``fit_frozen`` trains its suffix.

    Callbacks given to ``fit_frozen`` see the suffix as ``self.model``; weights are shared, so
    ``EarlyStopping(restore_best_weights=True)`` works as is, but a checkpoint must save the
    full model. ``SaveFullModel(model, "best.keras", monitor="val_loss", save_best_only=True)``
    takes every ``ModelCheckpoint`` argument and ignores the model Keras hands it.

    While a suffix trains on cached features an epoch costs less than saving the full model, so
    the best weights are kept in memory and the full model is written once, when training ends
    (a process killed mid-fit loses that phase's unsaved best, never a saved one). When Keras
    trains the full model itself, every improvement is saved at once, as ``ModelCheckpoint`` does.
    After each write, ``<filepath>.json`` records the monitored value of the saved model.
    """

    def __init__(self, full_model: keras.Model, filepath: str | Path, **kwargs: Any) -> None:
        super().__init__(str(filepath), **kwargs)
        self._full_model = full_model
        self._trained: keras.Model | None = None
        self._pending: tuple[str, list[np.ndarray], float | None, int] | None = None

    def set_model(self, model: keras.Model) -> None:
        self._trained = model
        super().set_model(self._full_model)

    @property
    def defers(self) -> bool:
        """Whether saves wait for the end of training (a suffix of the full model trains)."""
        return self._trained is not None and self._trained is not self._full_model

    def _save_model(self, epoch: int, batch: int | None, logs: dict | None) -> None:
        if not self.defers:
            before = self.best
            super()._save_model(epoch, batch, logs)
            if self.best != before or not self.save_best_only:
                self._write_record(self._get_file_path(epoch, batch, logs), logs, epoch)
            return
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):
            value = (logs or {}).get(self.monitor)
            self._pending = (filepath, self._trained.get_weights(), value, epoch)

    def on_train_end(self, logs: dict | None = None) -> None:
        super().on_train_end(logs)
        if self._pending is None:
            return
        filepath, best, value, epoch = self._pending
        self._pending = None
        current = self._trained.get_weights()
        self._trained.set_weights(best)
        try:
            self._full_model.save(filepath, overwrite=True)
        finally:
            self._trained.set_weights(current)
        self._write_record(filepath, {self.monitor: value}, epoch)

    def _write_record(self, filepath: str, logs: dict | None, epoch: int) -> None:
        value = (logs or {}).get(self.monitor)
        record = {
            "monitor": self.monitor,
            "value": None if value is None else float(value),
            "epoch": int(epoch) + 1,
        }
        Path(f"{filepath}.json").write_text(json.dumps(record))


def saved_value(filepath: str | Path) -> float | None:
    """The monitored value ``SaveFullModel`` recorded for the model at ``filepath``, if any."""
    record = Path(f"{filepath}.json")
    if not Path(filepath).is_file() or not record.is_file():
        return None
    try:
        value = json.loads(record.read_text()).get("value")
    except (OSError, ValueError):
        return None
    return None if value is None else float(value)


def fit_frozen(
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    *,
    epochs: int,
    optimizer: Any,
    loss: Any,
    metrics: Iterable[Any] | None = None,
    callbacks: Iterable[keras.callbacks.Callback] = (),
    fine_tune_at: int | None = None,
    augment_views: int | None = None,
    class_weight: dict[int, float] | None = None,
    seed: int = 0,
    verbose: int | str = 1,
    initial_epoch: int = 0,
    refit_optimizer: Callable[[], Any] | None = None,
    solver: str = head_solver.GRADIENT,
    keep_features: bool = False,
) -> keras.callbacks.History:
    """Train what trains in ``model`` on features its frozen prefix computes once.

    The plan (``fast_path_plan``) decides: when valid, the prefix runs once over ``train`` (and
    augmented views of it when the model augments, see ``cache_features``) and once over
    ``validation`` (clean), and the suffix trains on the cached tensors; its weights are the
    model's. When not valid, this is ``model.compile(...)`` + ``model.fit(...)``. Either way a log
    line says which mode ran and ``history.fast_path`` holds the plan as a dict (with the seconds
    spent caching under ``"cache_seconds"``).

    Callbacks see the suffix model as ``self.model`` in the fast modes; use ``SaveFullModel`` to
    checkpoint. ``model`` is not compiled by the fast modes.

    With ``refit_optimizer`` (a factory of fresh optimizers), a fast mode and validation data, the
    fit above only chooses the epoch count: what trains is then reset to its weights before the
    fit and retrained on train + validation (augmented views of both, when the model augments)
    for the epoch of the best validation loss, without callbacks. Cached features make this cost
    little; ``history.fast_path["refit"]`` says ``{"epochs", "examples"}``.

    With ``solver="lbfgs"``, the whole backbone frozen and a linear head (``tlkeras.fitting.head_solver``),
    the head is not trained by epochs but solved to convergence: logistic regression on the cached
    features, its L2 strength chosen by validation log loss (``epochs`` is then unused). The
    callbacks see it as one epoch whose logs are the solved head's train and validation metrics;
    with ``refit_optimizer`` (any factory: nothing is optimised by gradient) it is then re-solved
    on train + validation at the chosen strength. ``history.fast_path["solver"]`` says what ran.

    With ``keep_features`` and the whole backbone frozen (pooled features cached), the clean view's
    features of ``train`` stay available to :func:`pooled_features` (the report's data audit then
    need not compute them again).

    Returns:
        The ``keras.callbacks.History`` of the fit.
    """
    head_solver.check_solver(solver)

    checks.integer("epochs", epochs, 0)
    plan = fast_path_plan(model, fine_tune_at, augment_views=augment_views)
    logger.info(plan.describe())
    if verbose:
        print(plan.describe(), flush=True)
    for note in plan.notes:
        logger.info("fast frozen path: %s", note)
    args = CompileArgs(optimizer=optimizer, loss=loss, metrics=list(metrics or []))
    fit = {"callbacks": callbacks, "class_weight": class_weight, "verbose": verbose}
    if not plan.valid:  # the whole model trains on the images
        history = _compile_and_fit(model, args, train, validation, epochs, initial_epoch, **fit)
        history.fast_path = plan.to_dict()
        return history
    # The suffix trains on features the frozen prefix computes once (its weights are the model's).
    with progress.step("cache_features"):
        cut = _cut_and_cache(model, plan, train, validation)
    if keep_features and plan.fine_tune_at is None and cut.arrays is not None:
        _POOLED[model] = (cut.arrays.views[0], cut.arrays.rest[0])
    why_not = _why_not_solved(
        solver, plan, model, cut.trained, loss, cut.arrays, validation, cut.val_arrays
    )
    if why_not is None:
        with progress.step("solve_head"):
            history = _solve_head(
                cut.trained,
                cut.arrays,
                cut.val_arrays,
                callbacks=callbacks,
                args=args,
                class_weight=class_weight,
                initial_epoch=initial_epoch,
                refit=refit_optimizer is not None,
                seed=seed,
                verbose=verbose,
            )
        history.fast_path = {**plan.to_dict(), **cut.extra, **history.fast_path}
        return history
    if solver == head_solver.LBFGS:
        cut.extra["solver"] = {"method": head_solver.GRADIENT, "why": why_not}
        logger.info("head solver: gradient epochs (%s)", why_not)
        if verbose:
            print(f"head trained by gradient epochs: {why_not}", flush=True)
    with progress.step("cache_features"):
        train_in, val_in = _cached_inputs(cut, train, validation, seed)
    initial = cut.trained.get_weights() if refit_optimizer is not None else None
    history = _compile_and_fit(cut.trained, args, train_in, val_in, epochs, initial_epoch, **fit)
    history.fast_path = {**plan.to_dict(), **cut.extra}
    if initial is not None and validation is not None:
        both = train_in.unbatch().concatenate(
            cache_features(
                cut.prefix,
                validation,
                views=cut.views,
                augmentation=cut.augmentation,
                seed=seed + 1,
            ).unbatch()
        )
        history.fast_path["refit"] = _refit(
            cut.trained,
            initial,
            both,
            best_epochs(history, initial_epoch),
            batch_size=batch_size_of(train),
            args=dataclasses.replace(args, optimizer=refit_optimizer()),
            class_weight=class_weight,
            seed=seed,
            verbose=verbose,
        )
    return history


@dataclasses.dataclass
class _Cut:
    """``fit_frozen``'s model cut at its frozen prefix, with the prefix's features computed."""

    prefix: keras.Model
    trained: keras.Model  # the suffix: what trains
    augmentation: keras.layers.Layer | None
    views: int
    arrays: CachedArrays | None  # None: past the memory budget
    val_arrays: CachedArrays | None
    extra: dict[str, Any]


def _cut_and_cache(
    model: keras.Model,
    plan: FastPathPlan,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
) -> _Cut:
    """Cut ``model`` at ``plan``'s boundary and run the prefix over both splits into memory."""
    start = time.perf_counter()
    prefix, trained = split_at_block(model, plan.fine_tune_at)
    augmentation = model.get_layer(AUGMENTATION_LAYER) if plan.mode == MODE_CACHED_VIEWS else None
    views = 1 + plan.augment_views if augmentation is not None else 1
    arrays = feature_arrays(prefix, train, views=views, augmentation=augmentation)
    val_arrays = feature_arrays(prefix, validation) if validation is not None else None
    extra = {"cache_seconds": round(time.perf_counter() - start, 3)}
    return _Cut(prefix, trained, augmentation, views, arrays, val_arrays, extra)


def _cached_inputs(
    cut: _Cut, train: tf.data.Dataset, validation: tf.data.Dataset | None, seed: int
) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
    """The suffix's training and validation datasets of cached features."""
    # Past the memory budget the features go to files (a temporary directory) instead.
    spill = None if cut.arrays is not None and cut.val_arrays is not None else tempfile.mkdtemp()
    train_in = (
        cut.arrays.dataset(seed=seed, shuffle=True)
        if cut.arrays is not None
        else cache_features(
            cut.prefix,
            train,
            views=cut.views,
            augmentation=cut.augmentation,
            seed=seed,
            shuffle=True,
            cache_dir=Path(spill) / "train",
        )
    )
    val_in = None
    if validation is not None:
        val_in = (
            cut.val_arrays.dataset()
            if cut.val_arrays is not None
            else cache_features(cut.prefix, validation, cache_dir=Path(spill) / "validation")
        )
    return train_in, val_in


def _compile_and_fit(
    trained: keras.Model,
    args: CompileArgs,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    epochs: int,
    initial_epoch: int,
    *,
    callbacks: Iterable[keras.callbacks.Callback],
    class_weight: dict[int, float] | None,
    verbose: int | str,
) -> keras.callbacks.History:
    compile_model(trained, args)
    with progress.step("epochs"):
        return trained.fit(
            train,
            validation_data=validation,
            epochs=initial_epoch + epochs,  # epoch numbers continue from earlier phases
            initial_epoch=initial_epoch,
            callbacks=list(callbacks),
            class_weight=class_weight,
            shuffle=False,  # datasets shuffle themselves; Keras would only warn
            verbose=verbose,
        )


def _why_not_solved(
    solver: str,
    plan: FastPathPlan,
    model: keras.Model,
    trained: keras.Model,
    loss: Any,
    arrays: CachedArrays | None,
    validation: tf.data.Dataset | None,
    val_arrays: CachedArrays | None,
) -> str | None:
    """Why the head is trained by gradient epochs rather than solved (``None``: solve it)."""
    if solver != head_solver.LBFGS:
        return f"solver={solver!r}"
    if plan.fine_tune_at is not None:
        return "only a head on the whole frozen backbone is solved"
    if arrays is None or (validation is not None and val_arrays is None):
        return "the cached features do not fit in memory"
    task = infer(model)[0]
    y = None if task == "multilabel" else head_solver.class_ids(arrays.rest[0])
    return head_solver.unsupported(trained, task, float(getattr(loss, "label_smoothing", 0.0)), y)


def _row_weights(
    rest: tuple[np.ndarray, ...], ids: np.ndarray, class_weight: dict[int, float] | None
) -> np.ndarray | None:
    """Per-example weights: the dataset's sample weights times the class weights."""
    weights = np.asarray(rest[1], np.float64).reshape(-1) if len(rest) > 1 else None
    if class_weight:
        by_class = np.array([float(class_weight.get(int(i), 1.0)) for i in ids])
        weights = by_class if weights is None else weights * by_class
    return weights


def _solve_head(
    trained: keras.Model,
    arrays: CachedArrays,
    val_arrays: CachedArrays | None,
    *,
    callbacks: Iterable[keras.callbacks.Callback],
    args: CompileArgs,
    class_weight: dict[int, float] | None,
    initial_epoch: int,
    refit: bool,
    seed: int,
    verbose: int | str,
) -> keras.callbacks.History:
    """``fit_frozen``'s L-BFGS head: solved, logged to the callbacks as one epoch, maybe refit."""
    n, count = len(arrays.rest[0]), len(arrays.views)
    ids = head_solver.class_ids(arrays.rest[0])
    weights = _row_weights(arrays.rest, ids, class_weight)
    x = np.concatenate(arrays.views)  # every cached view of an image is a row of its own
    y, groups = np.tile(ids, count), np.tile(np.arange(n), count)
    weights = None if weights is None else np.tile(weights, count)
    validation = None
    if val_arrays is not None:
        val_ids = head_solver.class_ids(val_arrays.rest[0])
        validation = (val_arrays.views[0], val_ids, _row_weights(val_arrays.rest, val_ids, None))

    history = keras.callbacks.History()
    compile_model(trained, args)
    hooks = keras.callbacks.CallbackList(
        [*callbacks, history], model=trained, verbose=verbose, epochs=initial_epoch + 1, steps=1
    )
    hooks.on_train_begin()
    hooks.on_epoch_begin(initial_epoch)
    solution = head_solver.solve(
        trained, x, y, groups=groups, sample_weight=weights, validation=validation, seed=seed
    )
    logs = _cached_metrics(trained, arrays)
    if val_arrays is not None:
        logs.update({f"val_{k}": v for k, v in _cached_metrics(trained, val_arrays).items()})
    if verbose:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items())
        print(
            f"head solved by L-BFGS: C={solution.C:g} chosen by {solution.selected_by} log loss "
            f"among {solution.strengths_tried} strengths ({solution.iterations} iterations); {shown}",
            flush=True,
        )
    hooks.on_epoch_end(initial_epoch, logs)
    hooks.on_train_end(logs)
    history.fast_path = {"solver": solution.to_dict()}
    if refit and validation is not None:
        rows = np.concatenate([x, validation[0]])
        labels = np.concatenate([y, validation[1]])
        both = head_solver.join_weights(weights, len(x), validation[2], len(validation[1]))
        head_solver.refit(
            trained, rows, labels, solution.C, sample_weight=both, start=solution.start
        )
        examples = n + len(validation[1])
        history.fast_path["refit"] = {
            "examples": examples,
            "solver": head_solver.LBFGS,
            "C": solution.C,
        }
        if verbose:
            print(
                f"refit: the head re-solved on train + validation ({examples} images) at "
                f"C={solution.C:g}",
                flush=True,
            )
    return history


def _cached_metrics(trained: keras.Model, arrays: CachedArrays) -> dict[str, float]:
    """The compiled metrics of ``trained`` on the clean view of cached features."""
    clean = arrays.dataset(views=1)
    return {k: float(v) for k, v in trained.evaluate(clean, return_dict=True, verbose=0).items()}


def best_epochs(history: keras.callbacks.History, initial_epoch: int = 0) -> int:
    """Epochs of the fit up to its lowest ``val_loss`` (all of them without one)."""
    losses = history.history.get("val_loss") or []
    finite = [(v, i) for i, v in enumerate(losses) if v is not None and np.isfinite(v)]
    if not finite:
        return max(1, len(history.history.get("loss", [])))
    index = min(finite)[1]
    epoch = history.epoch[index] if len(history.epoch) == len(losses) else index + initial_epoch
    return max(1, int(epoch) - int(initial_epoch) + 1)


def _refit(
    trained: keras.Model,
    initial: list[np.ndarray],
    examples: tf.data.Dataset,
    epochs: int,
    *,
    batch_size: int,
    args: CompileArgs,
    class_weight: dict[int, float] | None,
    seed: int,
    verbose: int | str,
) -> dict[str, int]:
    """Retrain ``trained`` from ``initial`` on every example (unbatched) for ``epochs`` epochs."""
    n = int(examples.reduce(0, lambda count, _: count + 1))
    data = examples.shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    if verbose:
        print(
            f"refit: retraining from the phase's start on train + validation ({n} examples) "
            f"for {epochs} epochs, the best validation epoch",
            flush=True,
        )
    trained.set_weights(initial)
    compile_model(trained, args)
    steps = -(-n // batch_size)
    trained.fit(
        data.repeat().prefetch(tf.data.AUTOTUNE),
        steps_per_epoch=steps,  # the concatenation's length is unknown to Keras
        epochs=epochs,
        callbacks=[keras.callbacks.TerminateOnNaN()],
        class_weight=class_weight,
        shuffle=False,
        verbose=0,
    )
    return {"epochs": int(epochs), "examples": n}
