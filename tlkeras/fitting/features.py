"""The fast frozen path: compute what a frozen backbone computes once, and train only what trains.

A frozen prefix of the network (inference mode, no trainable weights) maps each image to the same
tensors every epoch. ``split_at_block`` cuts a ``tlkeras.build_model`` model at a block boundary into a
*prefix* (image -> boundary tensors) and a *suffix* (boundary tensors -> predictions) that **share the
layer objects** of the model, so training the suffix trains the model. ``cache_features`` runs the
prefix once over a dataset; ``fit_frozen`` trains the suffix on the cached tensors, leaving the trained
weights in the full Functional model.

Augmentation sits *before* the frozen part, so cached features cannot be re-augmented. With
augmentation on, ``fit_frozen`` is honest about it: it computes a fixed number of augmented views per
image once (plus the clean one) and samples one view per image per epoch (mode ``"cached_views"``).
The mode that ran is logged and returned (``history.fast_path``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras.data.augment import fast_path_note
from tlkeras.fitting import head_solver
from tlkeras.models.blocks import blocks as list_blocks
from tlkeras.models.blocks import resolve_block_index
from tlkeras.models.spec import get_spec
from tlkeras.models.task import infer

logger = logging.getLogger(__name__)

# Augmented views cached per training image when the model augments (plus the clean one). One:
# with the solved head on ants/bees (3 seeds) 0 views scored 79.7 %, 1 view 82.9 %, 4 views 82.4 %;
# on CPU each view costs an augmentation pass (~4.5 ms/image at 224²) plus a forward pass.
DEFAULT_AUGMENT_VIEWS = 1
# Features are kept in memory up to this fraction of the available RAM, else cached to a file.
MEMORY_FRACTION = 0.25

BACKBONE_LAYER = "backbone"
AUGMENTATION_LAYER = "augmentation"
POOL_LAYER = "pool"

MODE_CACHED = "cached"  # no augmentation in the model: one clean pass
MODE_CACHED_VIEWS = (
    "cached_views"  # augmentation: 1 clean + N augmented views, one sampled per epoch
)
MODE_CACHED_CLEAN = "cached_clean"  # augmentation present but augment_views=0: trained without it
MODE_FULL_MODEL = "full_model"  # fast path not valid: plain model.fit
MODES = (MODE_CACHED, MODE_CACHED_VIEWS, MODE_CACHED_CLEAN, MODE_FULL_MODEL)

# Layers whose training-mode output is random: off in the (inference-mode) prefix.
_STOCHASTIC = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


@dataclass(frozen=True)
class FastPathPlan:
    """Whether the fast frozen path applies to a model, why not, and which mode it uses.

    Attributes:
        valid: every layer before the boundary is frozen and its BatchNormalization runs in
            inference mode.
        mode: one of ``MODES``; ``"full_model"`` when not valid.
        reason: why it is not valid, or what it does.
        fine_tune_at: the block boundary (``None``: the whole backbone is frozen).
        boundary: names of the tensors crossing the boundary (what is cached per image).
        augment_views: augmented views cached per image (0 without augmentation).
        frozen_layers: backbone layers in the cached prefix.
        notes: caveats worth a log line (e.g. dropout inside the frozen part is off).
        augmentation: what the cached augmented views are views of (``augment.fast_path_note``:
            a mixing preset's batch mixing is not applied to cached features).
    """

    valid: bool
    mode: str
    reason: str
    fine_tune_at: int | None = None
    boundary: tuple[str, ...] = ()
    augment_views: int = 0
    frozen_layers: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    augmentation: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"expected mode in {MODES}, received {self.mode!r}")
        if self.valid == (self.mode == MODE_FULL_MODEL):
            raise ValueError(
                f"expected mode {MODE_FULL_MODEL!r} exactly when the plan is not valid, "
                f"received valid={self.valid} mode={self.mode!r}"
            )

    def describe(self) -> str:
        """One log line: the mode and what it caches, or why the fast path does not apply."""
        if not self.valid:
            return f"fast frozen path off ({self.reason}); training the full model"
        where = "backbone output" if self.fine_tune_at is None else f"block {self.fine_tune_at}"
        views = {
            MODE_CACHED: "1 clean view",
            MODE_CACHED_VIEWS: f"1 clean + {self.augment_views} augmented views, one sampled per epoch"
            + (f"; {self.augmentation}" if self.augmentation else ""),
            MODE_CACHED_CLEAN: "1 clean view; augmentation not applied (augment_views=0)",
        }[self.mode]
        return (
            f"fast frozen path: mode={self.mode}, caching {len(self.boundary)} tensor(s) at the "
            f"{where} ({views})"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["boundary"] = list(self.boundary)
        out["notes"] = list(self.notes)
        return out


# --------------------------------------------------------------------------------------------
# Graph helpers


def _graph_nodes(function: keras.Model) -> list[Any]:
    """The nodes of a Functional's own graph (layers gain extra nodes when called elsewhere)."""
    return [
        n for depth in sorted(function._nodes_by_depth) for n in function._nodes_by_depth[depth]
    ]


def _node_of(model: keras.Model, layer: keras.layers.Layer) -> Any:
    nodes = [n for n in _graph_nodes(model) if n.operation is layer]
    if len(nodes) != 1:
        raise ValueError(
            f"expected layer {layer.name!r} to be called once in model {model.name!r}, "
            f"received {len(nodes)} calls"
        )
    return nodes[0]


def _backbone(model: keras.Model) -> keras.Model:
    try:
        backbone = model.get_layer(BACKBONE_LAYER)
    except ValueError:
        raise ValueError(
            f"expected a model from tlkeras.build_model with a layer named {BACKBONE_LAYER!r}, "
            f"received a model with layers {[layer.name for layer in model.layers]}"
        ) from None
    if not isinstance(backbone, keras.Model):
        raise TypeError(
            f"expected layer {BACKBONE_LAYER!r} to be a keras.Model, received {type(backbone).__name__}"
        )
    return backbone


def _num_blocks_and_prefix(
    model: keras.Model, k: int | None
) -> tuple[int | None, list[keras.layers.Layer]]:
    """Normalise ``k`` and list the backbone layers before block ``k`` (all of them for ``None``)."""
    backbone = _backbone(model)
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    if k is None:
        return None, layers
    blocks = list_blocks(model)
    k = resolve_block_index(blocks, int(k) if isinstance(k, np.integer) else k)

    # tlkeras.models.blocks assigns every backbone layer to exactly one block, in topological order.
    prefix = [
        layer
        for block in blocks
        if block.index < k
        for layer in block.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    return k, prefix


def _check_cut(backbone: keras.Model, prefix_ids: set[int]) -> list[Any]:
    """Boundary tensors: produced before the cut, consumed after it (or the backbone's output)."""
    boundary: dict[int, Any] = {}
    backbone_input_ops = {id(t._keras_history.operation) for t in backbone.inputs}
    before = prefix_ids | backbone_input_ops
    for node in _graph_nodes(backbone):
        op = node.operation
        if isinstance(op, keras.layers.InputLayer):
            continue
        for t in node.input_tensors:
            producer = id(t._keras_history.operation)
            if id(op) in prefix_ids and producer not in before:
                raise ValueError(
                    f"expected the frozen blocks to precede the trainable ones, received layer "
                    f"{op.name!r} before the boundary consuming {t.name!r} from after it"
                )
            if id(op) not in prefix_ids and producer in before:
                boundary.setdefault(id(t), t)
    for t in backbone.outputs:
        if id(t._keras_history.operation) in before:
            boundary.setdefault(id(t), t)
    return list(boundary.values())


def _pool_after_backbone(model: keras.Model) -> keras.layers.Layer | None:
    """The parameter-free global pooling right after the backbone, if any (cached too: C floats)."""
    try:
        pool = model.get_layer(POOL_LAYER)
    except ValueError:
        return None
    backbone = _backbone(model)
    node = _node_of(model, pool)
    if pool.weights or len(node.input_tensors) != 1:
        return None
    if node.input_tensors[0]._keras_history.operation is not backbone:
        return None
    return pool


def _prefix_outer_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Outer layers the prefix runs before the backbone (input, augmentation, preprocessing)."""
    backbone = _backbone(model)
    ancestors: list[keras.layers.Layer] = []
    stack = list(_node_of(model, backbone).input_tensors)
    seen: set[int] = set()
    while stack:
        t = stack.pop()
        op = t._keras_history.operation
        if id(op) in seen:
            continue
        seen.add(id(op))
        ancestors.append(op)
        stack.extend(_node_of(model, op).input_tensors)
    return ancestors


# --------------------------------------------------------------------------------------------
# Public API


def fast_path_plan(
    model: keras.Model, fine_tune_at: int | None = None, *, augment_views: int | None = None
) -> FastPathPlan:
    """Say whether the fast frozen path is valid for ``model`` with its current trainable flags.

    Valid when every layer before block ``fine_tune_at`` of the backbone (all of it for ``None``)
    and every layer before the backbone is frozen, so BatchNormalization there runs in inference
    mode: then the prefix maps each image to the same tensors every epoch. Call
    ``tlkeras.apply_strategy`` first; this function only reads flags.

    Args:
        model: a model from ``tlkeras.build_model``.
        fine_tune_at: the first trainable block, ``None`` for a fully frozen backbone.
        augment_views: augmented views to cache when the model has an ``augmentation`` layer
            (default ``DEFAULT_AUGMENT_VIEWS``; 0 trains on clean features only and says so).

    Returns:
        A ``FastPathPlan``.
    """
    if augment_views is not None and (
        isinstance(augment_views, bool)
        or not isinstance(augment_views, (int, np.integer))
        or augment_views < 0
    ):
        raise ValueError(
            f"expected augment_views to be an int >= 0 or None, received {augment_views!r}"
        )
    backbone = _backbone(model)
    k, prefix = _num_blocks_and_prefix(model, fine_tune_at)

    def invalid(reason: str) -> FastPathPlan:
        return FastPathPlan(valid=False, mode=MODE_FULL_MODEL, reason=reason, fine_tune_at=k)

    outer = _prefix_outer_layers(model)
    has_augmentation = any(layer.name == AUGMENTATION_LAYER for layer in outer)
    for layer in outer + prefix:
        if layer.trainable_weights:
            return invalid(
                f"layer {layer.name!r} before the boundary is trainable; expected it frozen "
                f"(call tlkeras.apply_strategy with fine_tune_at={k} first)"
            )
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            return invalid(
                f"BatchNormalization {layer.name!r} before the boundary is in training mode; "
                f"expected it frozen"
            )
    boundary = _check_cut(backbone, {id(layer) for layer in prefix})
    names = [t._keras_history.operation.name for t in boundary]
    if k is None and _pool_after_backbone(model) is not None:
        names = [POOL_LAYER]
    notes = []
    stochastic = [layer.name for layer in prefix if isinstance(layer, _STOCHASTIC)]
    if stochastic:
        notes.append(
            f"{len(stochastic)} dropout/noise layer(s) in the frozen part run in inference mode "
            f"(e.g. {stochastic[0]!r})"
        )
    if not has_augmentation:
        mode, views = MODE_CACHED, 0
    else:
        views = DEFAULT_AUGMENT_VIEWS if augment_views is None else int(augment_views)
        mode = MODE_CACHED_VIEWS if views else MODE_CACHED_CLEAN
    try:
        augmentation = fast_path_note(get_spec(model).augment) if views else None
    except ValueError:  # no tlkeras spec: the views are of whatever the model's layer does
        augmentation = None
    return FastPathPlan(
        valid=True,
        mode=mode,
        reason="everything before the boundary is frozen",
        fine_tune_at=k,
        boundary=tuple(names),
        augment_views=views,
        frozen_layers=len(prefix),
        notes=tuple(notes),
        augmentation=augmentation,
    )


def split_at_block(model: keras.Model, k: int | None) -> tuple[keras.Model, keras.Model]:
    """Cut ``model`` before backbone block ``k`` into a prefix and a suffix sharing its layers.

    The prefix maps the model input to the tensors crossing the boundary before block ``k`` (there
    may be several: NASNet cells take two inputs). With ``k=None`` the boundary is the backbone
    output, taken after the model's parameter-free ``pool`` layer when it has one, so a cached image
    costs C floats rather than H×W×C. The suffix maps those tensors to the model output and reuses
    the layer objects of ``model``: training the suffix trains ``model``. Trainable flags are not
    checked here (see ``fast_path_plan``).

    Args:
        model: a model from ``tlkeras.build_model``.
        k: block index (negative counts from the end) or ``None``.

    Returns:
        ``(prefix, suffix)``: Functional models; ``suffix(prefix(x))`` equals ``model(x)`` at
        inference.
    """
    backbone = _backbone(model)
    k, prefix_layers = _num_blocks_and_prefix(model, k)
    backbone_node = _node_of(model, backbone)
    (backbone_in,) = backbone_node.input_tensors
    (backbone_out,) = backbone_node.output_tensors
    model_input = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    pool = _pool_after_backbone(model) if k is None else None
    if pool is not None:
        (cut,) = _node_of(model, pool).output_tensors
        prefix = keras.Model(model_input, cut, name="prefix")
        suffix = keras.Model(cut, model.outputs, name="suffix")
        return prefix, suffix

    boundary = _check_cut(backbone, {id(layer) for layer in prefix_layers})
    # Inner graph pieces: backbone input -> boundary, boundary -> backbone output. Keras clones the
    # graph nodes for intermediate inputs (functional.clone_graph_nodes) but shares the layers.
    inner_prefix = keras.Model(backbone.inputs, boundary, name="backbone_prefix")
    inner_suffix = keras.Model(
        boundary if len(boundary) > 1 else boundary[0], backbone.output, name="backbone_suffix"
    )
    tail = keras.Model(backbone_out, model.output, name="head_tail")

    crossing = inner_prefix(backbone_in)
    prefix = keras.Model(model_input, crossing, name="prefix")
    inputs = [
        keras.Input(shape=t.shape[1:], dtype=t.dtype, name=f"boundary_{i}")
        for i, t in enumerate(boundary)
    ]
    # The model may call its backbone with a fixed `training` (tlkeras: False unless train_bn); the
    # suffix must call the rest of the backbone the same way.
    call_kwargs = {
        key: value
        for key, value in backbone_node.arguments.kwargs.items()
        if key == "training" and value is not None
    }
    outputs = tail(inner_suffix(inputs if len(inputs) > 1 else inputs[0], **call_kwargs))
    suffix = keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name="suffix")
    return prefix, suffix


def _split_element(element: Any) -> tuple[Any, tuple[Any, ...]]:
    if not isinstance(element, (tuple, list)) or len(element) < 2:
        raise ValueError(
            "expected a dataset of (images, labels) or (images, labels, sample_weights) batches, "
            f"received elements of type {type(element).__name__}"
        )
    return element[0], tuple(element[1:])


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported platform: assume a modest machine
        return 4 << 30


def cache_features(
    prefix: keras.Model,
    dataset: tf.data.Dataset,
    *,
    views: int = 1,
    augmentation: keras.layers.Layer | None = None,
    seed: int = 0,
    shuffle: bool = False,
    cache_dir: str | Path | None = None,
) -> tf.data.Dataset:
    """Run the frozen ``prefix`` once over ``dataset`` and return a dataset of its outputs.

    View 0 is the clean image; views 1..``views``-1 pass the images through ``augmentation`` in
    training mode first. The returned dataset yields ``(features, *rest)`` batches of the input's
    batch size (``rest``: labels and optional sample weights, unchanged) and, with several views,
    picks one view per image at random on every pass (every epoch). Features are float32 (parity
    with the full model) and kept in memory when they fit in ``MEMORY_FRACTION`` of the available
    RAM; otherwise (or when ``cache_dir`` is given) each view is cached to a file there.

    Args:
        prefix: from ``split_at_block``; frozen.
        dataset: batched ``(images, labels[, sample_weights])``.
        views: total views per image, >= 1 (1: clean only).
        augmentation: the model's augmentation layer; required when ``views > 1``.
        seed: seeds the view sampling and the shuffling.
        shuffle: reshuffle the examples on every pass (for training data).
        cache_dir: directory for file caches instead of memory.

    Returns:
        A ``tf.data.Dataset``.
    """
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise ValueError(f"expected views to be an int >= 1, received {views!r}")
    if views > 1 and augmentation is None:
        raise ValueError(f"expected an augmentation layer for views={views}, received None")
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"expected a tf.data.Dataset, received {type(dataset).__name__}")

    if cache_dir is None:
        cached = feature_arrays(prefix, dataset, views=views, augmentation=augmentation)
        if cached is not None:
            return cached.dataset(seed=seed, shuffle=shuffle)
    # File-backed: one cached pass per view, zipped so the same example lines up across views.
    features = _features_fn(prefix, augmentation)

    directory = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="tlkeras_features_"))
    directory.mkdir(parents=True, exist_ok=True)
    unbatched = []
    for v in range(views):
        ds = dataset.map(
            lambda *e, v=v: (features(e[0], v > 0),) + tuple(e[1:]),
            num_parallel_calls=1,
            deterministic=True,
        )
        ds = ds.unbatch().cache(str(directory / f"view{v}"))
        for _ in ds:  # fill the cache now: cost is paid once, here
            pass
        unbatched.append(ds)
    batch_size = _batch_size(dataset)
    feats = [ds.map(lambda *e: e[0]) for ds in unbatched]
    labels = unbatched[0].map(lambda *e: tuple(e[1:]))
    n = int(unbatched[0].reduce(0, lambda c, _: c + 1))
    return _sample_views(feats, labels, n=n, batch_size=batch_size, seed=seed, shuffle=shuffle)


@dataclass(frozen=True)
class CachedArrays:
    """Cached features in memory: ``views[v]`` holds view ``v`` of every example (view 0 clean),
    ``rest`` the labels (and sample weights) in the same order, ``batch_size`` the input's."""

    views: list[Any]
    rest: tuple[np.ndarray, ...]
    batch_size: int

    def dataset(self, *, seed: int = 0, shuffle: bool = False, views: int | None = None):
        """Batches of ``(features, *rest)``, one view (of the first ``views``) drawn per example."""
        return _sample_arrays(
            self.views[:views], self.rest, batch_size=self.batch_size, seed=seed, shuffle=shuffle
        )


def _features_fn(prefix: keras.Model, augmentation: keras.layers.Layer | None) -> Callable:
    fn = _feature_function(prefix, augmentation)

    def features(images: tf.Tensor, augment: bool) -> Any:
        out = fn(images, tf.constant(augment))
        # tf.data reads a list as one tensor to stack; several boundary tensors are a tuple.
        return tuple(out) if isinstance(out, list) else out

    return features


def feature_arrays(
    prefix: keras.Model,
    dataset: tf.data.Dataset,
    *,
    views: int = 1,
    augmentation: keras.layers.Layer | None = None,
) -> CachedArrays | None:
    """Run ``prefix`` once per view over ``dataset`` into NumPy arrays (see ``cache_features``);
    ``None`` when they would exceed ``MEMORY_FRACTION`` of the available RAM."""
    features = _features_fn(prefix, augmentation)
    per_view: list[list[Any]] = [[] for _ in range(views)]
    rest: list[tuple[Any, ...]] = []
    budget, used, batch_size = MEMORY_FRACTION * _available_memory(), 0, 0
    for element in dataset:
        images, extra = _split_element(element)
        batch_size = batch_size or int(tf.shape(images)[0])
        for v in range(views):
            out = tf.nest.map_structure(lambda t: t.numpy(), features(images, v > 0))
            per_view[v].append(out)
            used += sum(a.nbytes for a in tf.nest.flatten(out))
        rest.append(tuple(np.asarray(e) for e in extra))
        if used > budget:
            logger.warning(
                "cached features exceed %.0f MiB of memory; caching to files instead",
                budget / 2**20,
            )
            return None
    if not rest:
        raise ValueError("expected a non-empty dataset, received one with no batches")
    stacked = [
        tf.nest.map_structure(lambda *a: np.concatenate(a), *batches) for batches in per_view
    ]
    labels = tuple(np.concatenate(parts) for parts in zip(*rest, strict=True))
    return CachedArrays(stacked, labels, batch_size)


def _feature_function(prefix: keras.Model, augmentation: keras.layers.Layer | None) -> Any:
    """Compiled ``prefix`` on ``(images, augment)``, traced once for any batch size and for both
    the clean and the augmented views (a ``tf.cond`` picks the input; the backbone is traced once).

    Kept on the prefix so the training and validation passes share one trace: tracing costs about
    as much as a forward pass over a small dataset. No autograph: Keras layers need none, and
    converting every call in the backbone made the trace several times slower.
    """
    cache = getattr(prefix, "_tlkeras_feature_fns", None)
    if cache is None:
        cache = {}
        object.__setattr__(prefix, "_tlkeras_feature_fns", cache)
    # A clean-only caller reuses the function of an augmenting one (with augment=False).
    if "fn" in cache and (augmentation is None or cache["augmentation"] is augmentation):
        return cache["fn"]

    def run(images: tf.Tensor, augment: tf.Tensor) -> Any:
        if augmentation is not None:
            images = tf.cond(augment, lambda: augmentation(images, training=True), lambda: images)
        return prefix(images, training=False)

    spec = [
        tf.TensorSpec(prefix.inputs[0].shape, prefix.inputs[0].dtype),
        tf.TensorSpec([], tf.bool),
    ]
    cache["augmentation"] = augmentation
    cache["fn"] = tf.function(run, input_signature=spec, autograph=False)
    return cache["fn"]


def _sample_arrays(
    views: Sequence[Any],
    labels: tuple[np.ndarray, ...],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
) -> tf.data.Dataset:
    """``_sample_views`` for features in memory, a batch at a time: an epoch of a small head costs
    milliseconds, so per-example ``tf.data`` work would dominate it."""
    n = len(labels[0])
    # One tensor per structure leaf, [views, n, ...]: a batch is a single gather.
    stacked = tf.nest.map_structure(lambda *a: tf.constant(np.stack(a)), *views)
    rest = tuple(tf.constant(a) for a in labels)
    count = len(views)
    index = tf.data.Dataset.range(n)
    if shuffle:
        index = index.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    index = index.batch(batch_size)
    # A fresh random view per example on every pass over the data.
    pick = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(batch_size)

    def gather(i: tf.Tensor, r: tf.Tensor) -> tuple[Any, ...]:
        r = r[: tf.shape(i)[0]]
        where = tf.stack([tf.cast(r % count, tf.int64), i], axis=1)
        features = tf.nest.map_structure(lambda t: tf.gather_nd(t, where), stacked)
        return (features, *(tf.gather(t, i) for t in rest))

    return tf.data.Dataset.zip((index, pick)).map(gather).prefetch(tf.data.AUTOTUNE)


def _sample_views(
    views: Sequence[tf.data.Dataset],
    labels: tf.data.Dataset,
    *,
    n: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
) -> tf.data.Dataset:
    if len(views) == 1:
        ds = tf.data.Dataset.zip((views[0], labels)).map(lambda f, r: (f,) + tuple(r))
    else:
        # A fresh random view per example on every pass over the data.
        pick = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        count = len(views)

        def choose(r: tf.Tensor, fs: tuple[Any, ...], rest: tuple[Any, ...]) -> tuple[Any, ...]:
            i = tf.cast(r % count, tf.int32)
            branches = [lambda f=f: f for f in fs]
            return (tf.switch_case(i, branches),) + tuple(rest)

        ds = tf.data.Dataset.zip((pick, tuple(views), labels)).map(
            choose, num_parallel_calls=tf.data.AUTOTUNE
        )
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


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

    Returns:
        The ``keras.callbacks.History`` of the fit.
    """
    import time

    head_solver.check_solver(solver)

    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"expected epochs to be an int >= 0, received {epochs!r}")
    plan = fast_path_plan(model, fine_tune_at, augment_views=augment_views)
    logger.info(plan.describe())
    if verbose:
        print(plan.describe(), flush=True)
    for note in plan.notes:
        logger.info("fast frozen path: %s", note)
    # Invalid plan: the whole model trains on the images. Valid: the suffix trains on features the
    # frozen prefix computes once (its weights are the model's).
    trained, train_in, val_in, extra = model, train, validation, {}
    if plan.valid:
        start = time.perf_counter()
        prefix, trained = split_at_block(model, plan.fine_tune_at)
        augmentation = (
            model.get_layer(AUGMENTATION_LAYER) if plan.mode == MODE_CACHED_VIEWS else None
        )
        views = 1 + plan.augment_views if augmentation is not None else 1
        arrays = feature_arrays(prefix, train, views=views, augmentation=augmentation)
        val_arrays = feature_arrays(prefix, validation) if validation is not None else None
        extra = {"cache_seconds": round(time.perf_counter() - start, 3)}
        why_not = _why_not_solved(
            solver, plan, model, trained, loss, arrays, validation, val_arrays
        )
        if why_not is None:
            history = _solve_head(
                trained,
                arrays,
                val_arrays,
                callbacks=callbacks,
                compile_args={"optimizer": optimizer, "loss": loss, "metrics": metrics},
                class_weight=class_weight,
                initial_epoch=initial_epoch,
                refit=refit_optimizer is not None,
                seed=seed,
                verbose=verbose,
            )
            history.fast_path = {**plan.to_dict(), **extra, **history.fast_path}
            return history
        if solver == head_solver.LBFGS:
            extra["solver"] = {"method": head_solver.GRADIENT, "why": why_not}
            logger.info("head solver: gradient epochs (%s)", why_not)
            if verbose:
                print(f"head trained by gradient epochs: {why_not}", flush=True)
        # Past the memory budget the features go to files (a temporary directory) instead.
        spill = None if arrays is not None and val_arrays is not None else tempfile.mkdtemp()
        train_in = (
            arrays.dataset(seed=seed, shuffle=True)
            if arrays is not None
            else cache_features(
                prefix,
                train,
                views=views,
                augmentation=augmentation,
                seed=seed,
                shuffle=True,
                cache_dir=Path(spill) / "train",
            )
        )
        val_in = None
        if validation is not None:
            val_in = (
                val_arrays.dataset()
                if val_arrays is not None
                else cache_features(prefix, validation, cache_dir=Path(spill) / "validation")
            )

    initial = trained.get_weights() if refit_optimizer is not None else None
    trained.compile(optimizer=optimizer, loss=loss, metrics=list(metrics or []))
    history = trained.fit(
        train_in,
        validation_data=val_in,
        epochs=initial_epoch + epochs,  # epoch numbers continue from earlier phases
        initial_epoch=initial_epoch,
        callbacks=list(callbacks),
        class_weight=class_weight,
        shuffle=False,  # datasets shuffle themselves; Keras would only warn
        verbose=verbose,
    )
    history.fast_path = {**plan.to_dict(), **extra}
    if initial is not None and plan.valid and validation is not None:
        both = train_in.unbatch().concatenate(
            cache_features(
                prefix,
                validation,
                views=1 + plan.augment_views if augmentation is not None else 1,
                augmentation=augmentation,
                seed=seed + 1,
            ).unbatch()
        )
        history.fast_path["refit"] = _refit(
            trained,
            initial,
            both,
            best_epochs(history, initial_epoch),
            batch_size=_batch_size(train),
            compile_args={"optimizer": refit_optimizer(), "loss": loss, "metrics": metrics},
            class_weight=class_weight,
            seed=seed,
            verbose=verbose,
        )
    return history


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
    compile_args: dict[str, Any],
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
    trained.compile(**{**compile_args, "metrics": list(compile_args.get("metrics") or [])})
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
            f"among {len(head_solver.CS)} strengths ({solution.iterations} iterations); {shown}",
            flush=True,
        )
    hooks.on_epoch_end(initial_epoch, logs)
    hooks.on_train_end(logs)
    history.fast_path = {"solver": solution.to_dict()}
    if refit and validation is not None:
        rows = np.concatenate([x, validation[0]])
        labels = np.concatenate([y, validation[1]])
        both = head_solver.join_weights(weights, len(x), validation[2], len(validation[1]))
        head_solver.refit(trained, rows, labels, solution.C, sample_weight=both)
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


def _batch_size(dataset: tf.data.Dataset) -> int:
    images, _ = _split_element(next(iter(dataset)))
    return int(tf.shape(images)[0])


def _refit(
    trained: keras.Model,
    initial: list[np.ndarray],
    examples: tf.data.Dataset,
    epochs: int,
    *,
    batch_size: int,
    compile_args: dict[str, Any],
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
    trained.compile(**{**compile_args, "metrics": list(compile_args.get("metrics") or [])})
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
