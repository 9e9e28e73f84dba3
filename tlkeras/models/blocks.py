"""Blocks: a backbone's layers split into an ordered list of the family's natural units.

``stem`` first, then the family's units (MobileNetV2 ``block_k``, ResNet ``convN_blockM``, EfficientNet
``blockNx``, Inception ``mixedN``, NASNet cells, ...), then ``top`` (the layers after the last unit, such as
EfficientNet's ``top_conv``). Strategies freeze and unfreeze by block index.

How a layer finds its block:
1. Its name matches the family's rule (``tlkeras.models.backbones.FAMILIES``): that block.
2. Otherwise the graph decides. A *cut* layer is one that every input→output path passes through. The
   unnamed layers before the last cut that precedes any named block layer are the stem; those from the
   first cut after the last named block layer are the top. Between two consecutive cuts (a *segment*),
   unnamed layers take the block of the segment's named layers when there is exactly one (Xception's
   anonymous residual ``add``/``conv2d``); in segments that span several blocks (NASNet cells read the two
   previous cells) an unnamed layer takes the earliest block among its consumers (the ``activation_17``
   that opens a cell belongs to that cell); a segment with no named layer continues the block before it.
A stem or top with no weights besides BatchNormalization joins its neighbour block.
Blocks are ordered by their last layer in topological order, so no edge runs from a later block to an
earlier one; ``tests/models/test_blocks.py`` checks this for every backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
from keras.src.ops.function import make_node_key

from tlkeras.models.backbones import Family, get_backbone
from tlkeras.models.spec import get_spec

STEM = "stem"
TOP = "top"
BACKBONE_LAYER = "backbone"


@dataclass(frozen=True)
class Block:
    """One unit of a backbone: its name, position and Keras layers (in graph order)."""

    name: str
    index: int
    layers: tuple[keras.layers.Layer, ...]

    @property
    def trainable(self) -> bool:
        """Whether any weight of this block currently trains."""
        return any(layer.trainable_weights for layer in self.layers)

    @property
    def trainable_weights(self) -> list:
        return [w for layer in self.layers for w in layer.trainable_weights]

    @property
    def non_trainable_weights(self) -> list:
        return [w for layer in self.layers for w in layer.non_trainable_weights]

    def __repr__(self) -> str:
        return f"Block({self.index}: {self.name!r}, {len(self.layers)} layers, trainable={self.trainable})"


def _graph(backbone: keras.Model) -> tuple[list, dict[int, list[int]], dict[int, list[int]]]:
    """Layers in topological order and, by position, their producers and consumers in this graph."""
    layers = list(backbone.layers)
    pos = {id(layer): i for i, layer in enumerate(layers)}
    # The model's own graph, as Keras keys it: ignore nodes made by calls from an outer model.
    own_nodes = backbone._nodes
    producers: dict[int, list[int]] = {i: [] for i in range(len(layers))}
    consumers: dict[int, list[int]] = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        for node_index, node in enumerate(layer._inbound_nodes):
            if make_node_key(layer, node_index) not in own_nodes:
                continue
            for parent in node.parent_nodes:
                j = pos.get(id(parent.operation))
                if j is not None and j not in producers[i]:
                    producers[i].append(j)
                    consumers[j].append(i)
    return layers, producers, consumers


def _cut_positions(n: int, producers: dict[int, list[int]]) -> list[int]:
    """Positions no edge jumps over: in a single-input, single-output DAG, exactly the layers that
    every input→output path passes through."""
    # jump[p] > 0 iff some edge (a, b) has a < p < b.
    diff = [0] * (n + 1)
    for b, parents in producers.items():
        for a in parents:
            if b - a > 1:
                diff[a + 1] += 1
                diff[b] -= 1
    cuts, running = [], 0
    for p in range(n):
        running += diff[p]
        if running == 0:
            cuts.append(p)
    return cuts


def split_backbone(backbone: keras.Model, family: Family) -> list[Block]:
    """Split ``backbone`` (a ``keras.applications`` model, include_top=False) into blocks."""
    layers, producers, consumers = _graph(backbone)
    n = len(layers)
    key: list[str | None] = [family.block_of(layer.name) for layer in layers]
    named = [i for i, k in enumerate(key) if k is not None]
    if not named:
        raise ValueError(
            f"Found no {family.name} blocks ({family.block_unit}) in {backbone.name!r}: expected a "
            f"keras.applications {family.name} model"
        )
    cuts = _cut_positions(n, producers)
    stem_end = max((c for c in cuts if c < named[0]), default=-1)
    top_start = min((c for c in cuts if c > named[-1]), default=n)
    for i in range(0, stem_end + 1):
        key[i] = key[i] or STEM
    for i in range(top_start, n):
        key[i] = key[i] or TOP

    # Segments between consecutive cuts, inside the body.
    bounds = [c for c in cuts if stem_end <= c < top_start]
    segments = [
        range(a + 1, b + 1) for a, b in zip(bounds, bounds[1:] + [top_start - 1], strict=True)
    ]
    single: dict[int, str] = {}
    for seg in segments:
        keys = {key[i] for i in seg if key[i] is not None}
        if len(keys) == 1:
            k = keys.pop()
            for i in seg:
                single[i] = k
    for i, k in single.items():
        key[i] = key[i] or k
    # Multi-block segments: earliest block among consumers; resolved back to front.
    order = {}
    for i in range(n):  # provisional order of blocks by last named layer
        if key[i] is not None:
            order[key[i]] = i
    for i in reversed(range(stem_end + 1, top_start)):
        if key[i] is None:
            owners = [key[j] for j in consumers[i] if key[j] is not None]
            if owners:
                key[i] = min(owners, key=lambda k: order.get(k, n))
    for i in range(n):  # segments without any named layer continue the block before them
        if key[i] is None:
            key[i] = key[i - 1] if i > 0 else STEM

    # A stem or top holding nothing a strategy could train besides BN (VGG's bare input, DenseNet's
    # final bn/relu, NASNet's final relu) joins its neighbour, so every block has something to unfreeze.
    def only_bn(k: str) -> bool:
        return not any(
            layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
            for layer, lk in zip(layers, key, strict=True)
            if lk == k
        )

    body = [k for k in key if k not in (STEM, TOP)]
    if STEM in key and only_bn(STEM):
        key = [body[0] if k == STEM else k for k in key]
    if TOP in key and only_bn(TOP):
        key = [body[-1] if k == TOP else k for k in key]

    last: dict[str, int] = {}
    for i, k in enumerate(key):
        last[k] = i
    names = sorted(last, key=last.__getitem__)
    members: dict[str, list] = {k: [] for k in names}
    for layer, k in zip(layers, key, strict=True):
        members[k].append(layer)
    return [Block(k, idx, tuple(members[k])) for idx, k in enumerate(names)]


def get_backbone_model(model: keras.Model) -> keras.Model:
    """The nested backbone of a tlkeras model (the layer named ``backbone``), or ``model`` itself when
    it is a bare ``keras.applications`` model."""
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        return model


def blocks(model: keras.Model, backbone: str | None = None) -> list[Block]:
    """The blocks of a model built by ``tlkeras.build_model`` (or of a bare backbone when
    ``backbone`` names its row in the table), stem first, top last."""
    if backbone is None:
        backbone = get_spec(model).backbone
    base = get_backbone_model(model)
    cache = getattr(base, "_tlkeras_blocks", None)
    if cache is None:
        cache = split_backbone(base, get_backbone(backbone).family)
        # Bypass Keras's attribute tracking: this is a cache, not state to save.
        object.__setattr__(base, "_tlkeras_blocks", cache)
    return list(cache)


def block_names(model: keras.Model) -> list[str]:
    return [b.name for b in blocks(model)]


def resolve_block_index(all_blocks: Sequence[Block], k: int) -> int:
    """``k`` as a non-negative index with 0 < k < len(blocks); negative counts from the end."""
    n = len(all_blocks)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"fine_tune_at: expected an int block index, received {type(k).__name__}")
    if not (-(n - 1) <= k <= n - 1) or k == 0:
        names = ", ".join(f"{i}:{b.name}" for i, b in enumerate(all_blocks))
        raise ValueError(
            f"fine_tune_at: expected 1..{n - 1} or -{n - 1}..-1 (blocks < k stay frozen; the "
            f"backbone has {n} blocks: {names}), received {k}"
        )
    return k % n
