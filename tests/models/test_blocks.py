"""Block splitting, checked on every one of the 40 backbones (weights=None, smallest input)."""

import keras
import pytest
from conftest import every_backbone, small_input

import tlkeras
from tlkeras.fitting.optimizers import block_lr_multipliers
from tlkeras.models.blocks import STEM, TOP, _graph, resolve_block_index, split_backbone

# The natural unit each family must produce (a sample of expected block names).
EXPECTED = {
    "VGG16": ["block1", "block5"],  # the bare input joins block1
    "ResNet50": ["stem", "conv2_block1", "conv5_block3"],
    "ResNet50V2": ["stem", "conv2_block1", "conv5_block3"],  # post_bn/post_relu join conv5_block3
    "Xception": ["block1", "block14"],
    "InceptionV3": ["stem", "mixed0", "mixed10"],
    "InceptionResNetV2": ["stem", "mixed_5b", "block35_1", "block17_20", "block8_10", "top"],
    "MobileNet": ["stem", "conv_1", "conv_13"],
    "MobileNetV2": ["stem", "expanded_conv", "block_1", "block_16", "top"],
    "MobileNetV3Small": ["stem", "expanded_conv", "expanded_conv_10", "top"],
    "DenseNet121": ["stem", "conv2_block1", "transition_pool2", "conv5_block16"],
    "NASNetMobile": [
        "stem",
        "cell_stem_1",
        "cell_normal_0",
        "cell_reduce_4",
        "cell_normal_12",  # the final weightless relu joins the last cell
    ],
    "EfficientNetB0": ["stem", "block1a", "block7a", "top"],
    "EfficientNetV2B0": ["stem", "block1a", "block6h", "top"],
    "ConvNeXtTiny": ["stem", "stage0_block0", "downsampling_0", "stage3_block2", "top"],
}


@pytest.fixture(scope="module", params=every_backbone())
def split(request):
    name = request.param
    base = tlkeras.build_backbone(name, small_input(name), weights=None)
    yield name, base, split_backbone(base, tlkeras.get_backbone(name).family)
    keras.backend.clear_session()


def test_every_layer_in_exactly_one_block(split):
    name, base, blocks = split
    seen = [id(layer) for b in blocks for layer in b.layers]
    assert len(seen) == len(set(seen)), f"{name}: a layer is in two blocks"
    assert set(seen) == {id(layer) for layer in base.layers}, f"{name}: a layer is in no block"
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert len({b.name for b in blocks}) == len(blocks)


def test_blocks_follow_graph_order(split):
    name, base, blocks = split
    block_of = {id(layer): b.index for b in blocks for layer in b.layers}
    layers, producers, _ = _graph(base)
    for i, parents in producers.items():
        for j in parents:
            assert block_of[id(layers[j])] <= block_of[id(layers[i])], (
                f"{name}: {layers[j].name} (block {block_of[id(layers[j])]}) feeds "
                f"{layers[i].name} (block {block_of[id(layers[i])]})"
            )
    # Inside a block, layers keep graph order.
    pos = {id(layer): p for p, layer in enumerate(base.layers)}
    for b in blocks:
        assert [pos[id(layer)] for layer in b.layers] == sorted(
            pos[id(layer)] for layer in b.layers
        )


def test_stem_first_top_last_and_real_units(split):
    name, base, blocks = split
    names = [b.name for b in blocks]
    assert STEM not in names[1:] and TOP not in names[:-1]
    # Every block holds something a strategy can unfreeze (BN alone does not count).
    for b in blocks:
        assert any(
            layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
            for layer in b.layers
        ), f"{name}: block {b.name} has no trainable layer besides BN"
    assert base.layers[0] in blocks[0].layers  # the input layer opens the stem
    body = [b for b in blocks if b.name not in (STEM, TOP)]
    assert len(body) >= 5, f"{name}: only {len(body)} body blocks"
    # Anonymous layers (activation_17, add, conv2d_3) are assigned, not left to a catch-all block.
    assert max(len(b.layers) for b in body) < len(base.layers) / 2
    for expected in EXPECTED.get(name, []):
        assert expected in names, f"{name}: expected block {expected!r} in {names}"


def test_per_block_learning_rates_cover_every_weight_and_decay_towards_the_stem(split):
    # tlkeras.fitting.optimizers keys its table by variable path: every family must have unique paths, and
    # a block's weights must not train faster than a later block's.
    name, base, blocks = split
    table = block_lr_multipliers(base, 0.5, backbone=name)

    def paths(layers):
        return {
            v.path
            for layer in layers
            for sub in layer._flatten_layers(include_self=True)
            for v in sub._trainable_variables
        }

    assert set(table) == paths(base.layers), f"{name}: weights without a multiplier"
    by_block = [{table[p] for p in paths(b.layers)} for b in blocks]
    for i, scales in enumerate(by_block):
        assert scales <= {0.5 ** (len(blocks) - i)}, f"{name}: block {blocks[i].name} {scales}"
    assert by_block[-1] <= {0.5}


def test_blocks_of_a_built_model_are_cached_and_match():
    model = tlkeras.build_model("MobileNetV2", 3, weights=None, input_shape=(32, 32, 3))
    first = tlkeras.blocks(model)
    assert first == tlkeras.blocks(model)
    assert tlkeras.block_names(model)[:2] == ["stem", "expanded_conv"]
    assert all(layer in model.get_layer("backbone").layers for b in first for layer in b.layers)


@pytest.mark.parametrize(
    "k, expected",
    [(1, 1), (5, 5), (9, 9), (-1, 9), (-9, 1)],
)
def test_resolve_block_index(k, expected):
    fake = [object()] * 10
    assert resolve_block_index(fake, k) == expected


@pytest.mark.parametrize("k", [0, 14, -14, 99])
def test_resolve_block_index_out_of_range(k):
    model = tlkeras.build_model("MobileNet", 2, weights=None, input_shape=(32, 32, 3))
    with pytest.raises(
        ValueError, match=r"expected 1\.\.13 or -13\.\.-1.*0:stem, 1:conv_1.*received"
    ):
        resolve_block_index(tlkeras.blocks(model), k)


@pytest.mark.parametrize("k", [1.5, "3", True])
def test_resolve_block_index_type(k):
    with pytest.raises(TypeError, match="expected an int"):
        resolve_block_index([object()] * 4, k)
