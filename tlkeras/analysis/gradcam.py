"""Grad-CAM: where in the image the evidence for a class lies, for any tlkeras model.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a spatial feature map by the spatial mean
of the class score's gradient, sums the weighted channels, keeps the positive part and upsamples it
to the image. Where the map is taken matters: late enough for class-specific features, early enough
to keep some resolution.

- ``target_layer(model)``: the map. For a ``tlkeras.build_model`` model it is the output of the last
  ``tlkeras.models.blocks`` block whose output is spatial (``[N, h, w, c]`` with h, w > 1; at inputs so
  small that the last blocks see 1×1 maps, an earlier block), found from the block split, not from a
  table of layer names, so every one of the 40 backbones is covered. A plain Keras classifier (no
  tlkeras spec) uses the last layer of its own graph with a spatial output at or after its first
  weighted layer (a nested ``keras.applications`` base counts as one layer).
- ``gradcam(model, images, class_index=None)``: heat maps ``[N, H, W]`` in [0, 1].
- ``overlay(image, heatmap)``: a heat map coloured and blended over an image, for people.

What is differentiated: the class's **pre-activation logit** when the output layer is a ``Dense``
(or ``Activation``) with a softmax, sigmoid or linear activation, as tlkeras heads are. The softmax
probability would mix in every other class (its gradient is p_c (∇z_c − Σ_j p_j ∇z_j)) and vanishes
for confident predictions. Any other output layer: the model's output itself.

Heads: multiclass explains the logit of the class; **binary** (one sigmoid unit z) explains class 1
by z and class 0 by −z (evidence against class 1), so the two classes are the ``[1 − p, p]`` columns
the export serves; **multi-label** explains one label's own logit, independently of the others (with
``class_index=None``, the label with the highest score).

The model is cut right after the map into a prefix (image → the map, plus any tensor that skips
over it) and a suffix (→ the output layer's input), both sharing the model's layers (a map inside
the nested backbone: the backbone is cut and the outer graph rebuilt around its halves). Only the
suffix runs under the gradient tape, in inference mode. Built once per model and cached on it. Why
not ``tlkeras.fitting.frozen.split_at_block``: its suffix ends in the softmax, its ``k=None`` cut lies
after the global pooling, and its cuts require every graph node to be a block layer, which
ConvNeXt's residual adds (``keras.ops`` calls) are not, so it fails on ConvNeXt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras import checks
from tlkeras.models.blocks import Block, get_backbone_model
from tlkeras.models.blocks import blocks as list_blocks
from tlkeras.models.spec import get_spec

DEFAULT_ALPHA = 0.4
DEFAULT_COLORMAP = "jet"
# Activations the logit is recovered under: the output layer's input is the logit (Activation) or
# one matmul away from it (Dense).
_LOGIT_ACTIVATIONS = ("softmax", "sigmoid", "linear")
_CACHE_ATTR = "_tlkeras_gradcam"


@dataclass(frozen=True)
class Target:
    """The feature map Grad-CAM explains.

    Attributes:
        name: the block's name (tlkeras model) or the layer's name (plain Keras model).
        block_index: the block's index in ``tlkeras.blocks(model)``; ``None`` for a plain model.
        layer: the Keras layer whose output is the map (or operation: ConvNeXt's residual ``add``).
        shape: the map's ``(h, w, c)``.
    """

    name: str
    block_index: int | None
    layer: Any
    shape: tuple[int, int, int]


@dataclass
class _Explainer:
    """The model cut at its target map: built once per model (``_explainer``)."""

    target: Target
    prefix: keras.Model  # image -> the tensors crossing the cut, the map first
    suffix: keras.Model  # those tensors -> the output layer's input (or the output)
    to_logits: Callable[[tf.Tensor], tf.Tensor]  # the suffix's output -> logits (or scores)
    activation: Callable[[tf.Tensor], tf.Tensor]  # logits -> the model's output
    units: int
    from_logits: bool  # whether what is differentiated is a logit (else the model's output)
    image_size: tuple[int, int]
    function: Any = None  # ``_run`` as a tf.function, for ``gradcam``
    calls: int = 0  # ``gradcam`` calls so far: the first runs eagerly


def _is_spatial(shape: Sequence[int | None], strict: bool = True) -> bool:
    """A 4-D ``[N, h, w, c]`` map; ``strict``: with h, w > 1 (a 1×1 map has nowhere to point)."""
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        return False
    return not strict or (shape[1] > 1 and shape[2] > 1)


def _graph(model: keras.Model) -> keras.Model:
    """The Functional holding ``model``'s own graph (a ``Sequential`` keeps one inside)."""
    return getattr(model, "_functional", None) or model


def _nodes(model: keras.Model) -> list[Any]:
    """The call nodes of ``model``'s own graph in topological order, layers and operations alike
    (ConvNeXt's residual adds are ``keras.ops`` calls, not layers)."""
    graph = _graph(model)
    return [
        n
        for depth in sorted(graph._nodes_by_depth, reverse=True)
        for n in graph._nodes_by_depth[depth]
    ]


def _node(model: keras.Model, layer: Any) -> Any:
    nodes = [n for n in _nodes(model) if n.operation is layer]
    if len(nodes) != 1:
        raise ValueError(
            f"expected layer {layer.name!r} to be called once in model {model.name!r}, received "
            f"{len(nodes)} calls"
        )
    return nodes[0]


def _output_head(model: keras.Model) -> tuple[Any, Callable, Callable, bool]:
    """``(tensor, to_logits, activation, from_logits)``: the tensor to run the model to, how it
    becomes the logits, and how those become the model's output."""
    if len(model.outputs) != 1 or len(model.inputs) != 1:
        raise ValueError(
            f"expected a classifier with one image input and one output, received "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    (output,) = model.outputs
    layer = output._keras_history.operation
    activation = getattr(getattr(layer, "activation", None), "__name__", None)
    if activation in _LOGIT_ACTIVATIONS and isinstance(
        layer, (keras.layers.Dense, keras.layers.Activation)
    ):
        inputs = _node(model, layer).input_tensors
        if len(inputs) == 1:
            if isinstance(layer, keras.layers.Dense):

                def dense(x: tf.Tensor, layer: keras.layers.Dense = layer) -> tf.Tensor:
                    z = keras.ops.matmul(x, layer.kernel)
                    return z + layer.bias if layer.use_bias else z

                return inputs[0], dense, layer.activation, True
            return inputs[0], _identity, layer.activation, True
    return output, _identity, _identity, False


def _identity(x: tf.Tensor) -> tf.Tensor:
    return x


def _input_size(model: keras.Model) -> tuple[int, int]:
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[2] is None:
        raise ValueError(
            f"expected a model input of shape (None, H, W, 3) with H and W fixed, received {shape}"
        )
    return int(shape[1]), int(shape[2])


def _choose(candidates: list[tuple[Any, Any]]) -> tuple[Any, Any] | None:
    """The first candidate (latest first) with an h, w > 1 map, else the first 4-D one."""
    return next((c for c in candidates if _is_spatial(c[1].shape)), None) or (
        candidates[0] if candidates else None
    )


# --------------------------------------------------------------------------------------------------
# Finding the map and exposing it.


def _block_maps(backbone: keras.Model, all_blocks: list[Block]) -> list[tuple[Block, Any]]:
    """The 4-D tensors each block hands on to a later block (or that are the backbone's output),
    with the block that makes them, the last block's first. An operation that is not a layer (in no block)
    belongs with its latest input."""
    block_of = {id(layer): b.index for b in all_blocks for layer in b.layers}
    made_in: dict[int, int] = {}
    handed_on: set[int] = {id(t) for t in backbone.outputs}
    made: list[Any] = []
    for node in _nodes(backbone):
        op = node.operation
        inputs = list(node.input_tensors)
        index = block_of.get(id(op))
        if index is None:
            index = max((made_in.get(id(t), 0) for t in inputs), default=0)
        handed_on.update(id(t) for t in inputs if made_in.get(id(t), index) < index)
        for t in node.output_tensors:
            made_in[id(t)] = index
            if not isinstance(op, keras.layers.InputLayer):
                made.append(t)
    maps = [
        (all_blocks[made_in[id(t)]], t)
        for t in reversed(made)
        if id(t) in handed_on and _is_spatial(t.shape, strict=False)
    ]
    return sorted(maps, key=lambda m: -m[0].index)  # stable: latest made first within a block


def _cut(graph: keras.Model, tensor: Any) -> list[Any]:
    """The tensors of ``graph`` crossing a cut right after the node that makes ``tensor``:
    ``tensor`` first, then any made before it and used after it (NASNet cells read the previous
    two cells; a plain model may have skip connections)."""
    nodes = _nodes(graph)
    pos = next(i for i, n in enumerate(nodes) if any(t is tensor for t in n.output_tensors))
    made = {id(t) for n in nodes[: pos + 1] for t in n.output_tensors}
    crossing = {id(tensor): tensor}
    for n in nodes[pos + 1 :]:
        crossing.update((id(t), t) for t in n.input_tensors if id(t) in made)
    crossing.update((id(t), t) for t in graph.outputs if id(t) in made)
    return list(crossing.values())


def _split(model: keras.Model, tensor: Any, end: Any) -> tuple[keras.Model, keras.Model]:
    """``(prefix, suffix)`` of ``model``'s own graph cut after ``tensor``, sharing its layers."""
    crossing = _cut(model, tensor)
    prefix = keras.Model(model.inputs[0], crossing, name="gradcam_prefix")
    suffix = keras.Model(crossing if len(crossing) > 1 else tensor, end, name="gradcam_suffix")
    return prefix, suffix


def _split_in_backbone(
    model: keras.Model, tensor: Any, end: Any
) -> tuple[keras.Model, keras.Model]:
    """``(prefix, suffix)`` cut after ``tensor`` inside the nested backbone: the backbone is cut
    in two and the outer graph rebuilt around the halves (the layers are shared, not copied)."""
    backbone = get_backbone_model(model)
    node = _node(model, backbone)
    (backbone_in,) = node.input_tensors
    (backbone_out,) = node.output_tensors
    crossing = _cut(backbone, tensor)
    inner_prefix = keras.Model(backbone.inputs[0], crossing, name="backbone_prefix")
    inner_suffix = keras.Model(
        crossing if len(crossing) > 1 else tensor, backbone.outputs, name="backbone_suffix"
    )
    before = keras.Model(model.inputs[0], backbone_in, name="before_backbone")
    after = keras.Model(backbone_out, end, name="after_backbone")
    (image,) = model.inputs
    image = keras.Input(shape=tuple(image.shape[1:]), dtype=image.dtype, name="image")
    prefix = keras.Model(image, inner_prefix(before(image)), name="gradcam_prefix")
    inputs = [keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype) for t in crossing]
    (out,) = inner_suffix(inputs if len(inputs) > 1 else inputs[0])
    suffix = keras.Model(
        inputs if len(inputs) > 1 else inputs[0], after(out), name="gradcam_suffix"
    )
    return prefix, suffix


def _tlkeras_target(model: keras.Model) -> tuple[Target, Any, bool] | None:
    """``(target, map tensor, inside the backbone)`` of a tlkeras model, from its blocks."""
    backbone = get_backbone_model(model)
    chosen = _choose(_block_maps(backbone, list_blocks(model)))
    if chosen is None:
        return None
    block, tensor = chosen
    op = tensor._keras_history.operation
    target = Target(block.name, block.index, op, tuple(int(d) for d in tensor.shape[1:]))
    if any(tensor is t for t in backbone.outputs):  # the usual case: the outer graph has it
        (tensor,) = _node(model, backbone).output_tensors
        return target, tensor, False
    return target, tensor, True


def _plain_target(model: keras.Model) -> tuple[Target, Any, bool] | None:
    """``(target, map tensor, False)`` of a plain Keras model: its graph's last spatial output at
    or after its first weighted layer."""
    candidates = []
    weighted = False
    for node in _nodes(model):
        op = node.operation
        weighted = weighted or bool(getattr(op, "weights", None))
        outputs = node.output_tensors
        if weighted and len(outputs) == 1 and _is_spatial(outputs[0].shape, strict=False):
            candidates.append((op, outputs[0]))
    chosen = _choose(candidates[::-1])
    if chosen is None:
        return None
    op, tensor = chosen
    return Target(op.name, None, op, tuple(int(d) for d in tensor.shape[1:])), tensor, False


def _explainer(model: keras.Model) -> _Explainer:
    """The model rewired for Grad-CAM, cached on it (building costs graph walks and Keras model
    construction; a call then costs a forward pass and a partial backward pass)."""
    cached = getattr(model, _CACHE_ATTR, None)
    if cached is not None:
        return cached
    checks.instance("model", model, keras.Model, "a keras.Model")
    size = _input_size(model)
    end, to_logits, activation, from_logits = _output_head(model)
    try:
        get_spec(model)
        is_tlkeras = True
    except ValueError:
        is_tlkeras = False
    found = _tlkeras_target(model) if is_tlkeras else _plain_target(model)
    if found is None:
        where = "block of tlkeras.blocks(model)" if is_tlkeras else "layer after a weighted layer"
        raise ValueError(
            f"Grad-CAM: expected a model with a spatial feature map (a {where} with a 4-D "
            f"[N, h, w, c] output), received {model.name!r} with none "
            f"(its last layers: {[layer.name for layer in model.layers][-4:]})"
        )
    target, tensor, in_backbone = found
    prefix, suffix = (_split_in_backbone if in_backbone else _split)(model, tensor, end)
    units = int(model.outputs[0].shape[-1])
    explainer = _Explainer(target, prefix, suffix, to_logits, activation, units, from_logits, size)
    explainer.function = tf.function(
        lambda images, classes: _run(explainer, images, classes),
        input_signature=[
            tf.TensorSpec([None, *size, 3], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ],
        autograph=False,
    )
    # Bypass Keras's attribute tracking: a cache, not state to save.
    object.__setattr__(model, _CACHE_ATTR, explainer)
    return explainer


def target_layer(model: keras.Model) -> Target:
    """The feature map ``gradcam`` explains (see the module docstring for how it is found).

    Raises ``ValueError`` for a model with no spatial feature map.
    """
    return _explainer(model).target


# --------------------------------------------------------------------------------------------------
# The computation: graph-safe, shared by ``gradcam`` and the export's ``explain`` signature.


def _run(explainer: _Explainer, images: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
    """Heat maps for float32 ``images`` [N, H, W, 3]; ``class_index`` int32 [N], -1: the predicted
    class. Returns ``heatmaps`` [N, H, W], ``classes`` int32 [N] (the class explained) and
    ``outputs`` (the model's output, so a caller needs no second forward pass)."""
    e = explainer
    crossing = e.prefix(images, training=False)
    crossing = list(crossing) if isinstance(crossing, (list, tuple)) else [crossing]
    # Only the suffix is recorded: an eager tape differentiates everything it recorded (measured on
    # ConvNeXtTiny, the whole model on the tape made one call 10x slower).
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        feature_map = crossing[0]
        tape.watch(feature_map)
        features_out = e.suffix(crossing if len(crossing) > 1 else feature_map, training=False)
        logits = tf.cast(e.to_logits(features_out), tf.float32)
        if e.units == 1:  # binary: z for class 1, -z for class 0
            z = logits[:, 0]
            predicted = tf.cast(z > 0.0 if e.from_logits else z > 0.5, tf.int32)
            classes = tf.where(class_index < 0, predicted, class_index)
            score = tf.where(classes == 1, z, -z)
        else:
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
            classes = tf.where(class_index < 0, predicted, class_index)
            score = tf.gather(logits, classes, axis=1, batch_dims=1)
    # The rows are independent at inference, so one gradient of the sum gives each row's own.
    grads = tf.cast(tape.gradient(score, feature_map), tf.float32)
    feature_map = tf.cast(feature_map, tf.float32)
    weights = tf.reduce_mean(grads, axis=[1, 2])  # [N, c]
    cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", feature_map, weights))
    cam = tf.image.resize(cam[..., None], e.image_size, method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
    return {
        "heatmaps": tf.math.divide_no_nan(cam, peak),  # an all-zero map stays zero
        "classes": classes,
        "outputs": tf.cast(e.activation(logits), tf.float32),
    }


def explain_function(model: keras.Model) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """A graph-safe ``images -> {"heatmaps", "classes", "outputs"}`` explaining the predicted class,
    for serving signatures (see ``_run``). Raises ``ValueError`` as ``target_layer`` does."""
    explainer = _explainer(model)

    def explain(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return _run(explainer, images, tf.fill(tf.shape(images)[:1], -1))

    return explain


def _class_indices(class_index: Any, n: int, num_classes: int) -> np.ndarray:
    if class_index is None:
        return np.full(n, -1, np.int32)
    if isinstance(class_index, (int, np.integer)) and not isinstance(class_index, bool):
        values = np.full(n, int(class_index))
    elif isinstance(class_index, Sequence | np.ndarray) and not isinstance(class_index, str):
        values = np.asarray(class_index)
        if values.shape != (n,) or values.dtype.kind not in "iu":
            raise ValueError(
                f"class_index: expected None, an int or {n} ints (one per image), received "
                f"{class_index!r}"
            )
    else:
        raise ValueError(
            f"class_index: expected None, an int or {n} ints (one per image), received "
            f"{class_index!r}"
        )
    bad = [int(v) for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(
            f"class_index: expected class indices in 0..{num_classes - 1}, received {bad}"
        )
    return values.astype(np.int32)


def gradcam(
    model: keras.Model, images: Any, class_index: int | Sequence[int] | None = None
) -> np.ndarray:
    """Grad-CAM heat maps of ``model`` on ``images``: float32 ``[N, H, W]`` in [0, 1].

    Args:
        model: a ``tlkeras.build_model`` model (or a plain Keras classifier with a spatial layer).
        images: what the model takes, float pixels 0–255, ``[N, H, W, 3]`` at its input size.
        class_index: the class each map explains: ``None`` for the predicted class of each image
            (multi-label: the highest-scoring label), an int for all images, or one int per image.
            Binary models have classes 0 and 1 (see the module docstring).

    Each map is normalised by its own maximum, so maps show where, not how much, and are not
    comparable across images; a map with no positive evidence is all zeros.
    """
    explainer = _explainer(model)
    pixels = np.asarray(images, dtype=np.float32)
    want = (*explainer.image_size, 3)
    if pixels.ndim != 4 or pixels.shape[1:] != want:
        raise ValueError(
            f"images: expected a batch of shape (N, {want[0]}, {want[1]}, 3) (the model's input, "
            f"pixels 0-255), received {pixels.shape}"
        )
    num_classes = 2 if explainer.units == 1 else explainer.units
    classes = _class_indices(class_index, len(pixels), num_classes)
    if not len(pixels):
        return np.zeros((0, *explainer.image_size), np.float32)
    # The first call runs eagerly, later ones a traced graph: tracing costs several eager calls
    # on big graphs (InceptionResNetV2 at 75 px: 5.4 s against 1.0 s), a traced call is 2-4x
    # faster at 224 px (MobileNet, EfficientNetB0). The two agree to float32 rounding.
    run = explainer.function if explainer.calls else functools.partial(_run, explainer)
    explainer.calls += 1
    out = run(tf.constant(pixels), tf.constant(classes))
    return out["heatmaps"].numpy()


# --------------------------------------------------------------------------------------------------
# For people: a heat map over the image.


def overlay(
    image: Any, heatmap: Any, alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP
) -> np.ndarray:
    """``heatmap`` coloured with a matplotlib colormap and blended over ``image``: uint8 [H, W, 3].

    ``image``: RGB pixels 0–255 ``[H, W, 3]`` at any size (the original photo, say); ``heatmap``:
    ``[h, w]`` in [0, 1], resized bilinearly to the image when the sizes differ (the model's input
    was a stretched resize of the image, so stretching back lines them up). ``alpha`` is the heat
    map's weight: 0 gives the image, 1 the colours alone.
    """
    import matplotlib  # imported here: exporting and serving never draw

    pixels = np.asarray(image, dtype=np.float32)
    heat = np.asarray(heatmap, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"image: expected RGB pixels of shape (H, W, 3), received {pixels.shape}")
    if heat.ndim != 2:
        raise ValueError(f"heatmap: expected shape (h, w), received {heat.shape}")
    checks.interval("alpha", alpha, 0, 1)
    if heat.shape != pixels.shape[:2]:
        heat = tf.image.resize(heat[..., None], pixels.shape[:2], method="bilinear")[..., 0]
        heat = np.asarray(heat)
    colours = matplotlib.colormaps[colormap](np.clip(np.nan_to_num(heat), 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * pixels + alpha * 255.0 * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
