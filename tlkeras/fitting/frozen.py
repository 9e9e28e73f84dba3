"""The frozen prefix of a model: whether the fast path applies, and the cut at a block boundary.

A frozen prefix of the network (inference mode, no trainable weights) maps each image to the same
tensors every epoch. ``fast_path_plan`` says whether that holds for a model as its strategy left it
(and which mode the fast path uses); ``split_at_block`` cuts a ``tlkeras.build_model`` model at a
block boundary into a *prefix* (image -> boundary tensors) and a *suffix* (boundary tensors ->
predictions) that **share the layer objects** of the model, so training the suffix trains the model.
``tlkeras.fitting.feature_cache`` runs the prefix once over a dataset; ``tlkeras.fitting.fast_path``
trains the suffix on the cached tensors.

Augmentation sits *before* the frozen part, so cached features cannot be re-augmented. With
augmentation on, the fast path is honest about it: it computes a fixed number of augmented views
per image once (plus the clean one) and samples one view per image per epoch (mode
``"cached_views"``). The plan names the mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np

from tlkeras import checks
from tlkeras.data.augment import fast_path_note
from tlkeras.models.blocks import blocks as list_blocks
from tlkeras.models.blocks import resolve_block_index
from tlkeras.models.spec import get_spec

# Augmented views cached per training image when the model augments (plus the clean one). One:
# with the solved head on ants/bees (3 seeds) 0 views scored 79.7 %, 1 view 82.9 %, 4 views 82.4 %;
# on CPU each view costs an augmentation pass (~4.5 ms/image at 224²) plus a forward pass.
DEFAULT_AUGMENT_VIEWS = 1

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
    checks.integer("augment_views", augment_views, 0, optional=True)
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
