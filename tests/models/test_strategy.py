"""Strategies × every backbone: exactly the right weights train; the BatchNorm rule holds."""

import keras
import numpy as np
import pytest
from conftest import every_backbone, small_input

import tlkeras
from tlkeras import Strategy
from tlkeras.models.strategy import SCRATCH_BN_MOMENTUM, scratch_batchnorm

HEAD = ("pool", "head_dropout", "predictions")


@pytest.fixture(scope="module", params=every_backbone())
def model(request):
    name = request.param
    m = tlkeras.build_model(name, 3, weights=None, input_shape=small_input(name))
    yield m
    keras.backend.clear_session()


def _ids(weights):
    return {id(w) for w in weights}


def _expected_frozen(model, strategy):
    n = len(tlkeras.blocks(model))
    return {
        Strategy.SCRATCH: 0,
        Strategy.FEATURE_EXTRACTION: n,
        Strategy.PARTIAL: n // 2,
        Strategy.FULL: 0,
    }[strategy]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_trainable_weights_follow_strategy(model, strategy):
    blocks = tlkeras.blocks(model)
    k = len(blocks) // 2 if strategy is Strategy.PARTIAL else None
    n_frozen = tlkeras.apply_strategy(model, strategy, fine_tune_at=k)
    assert n_frozen == _expected_frozen(model, strategy)
    expected = set()
    for b in blocks:
        if b.index < n_frozen:
            assert not b.trainable_weights, f"{b.name} should be frozen"
            assert not b.trainable
            for layer in b.layers:
                assert not layer.trainable
        else:
            for layer in b.layers:
                bn = isinstance(layer, keras.layers.BatchNormalization)
                # BN trains only with train_bn (scratch implies it); everything else in the block trains.
                assert layer.trainable == (not bn or strategy is Strategy.SCRATCH), layer.name
                if not bn:
                    expected |= _ids(layer.trainable_weights)
            assert b.trainable, f"{b.name} should train"  # every block has non-BN weights
            if strategy is Strategy.SCRATCH:
                expected |= _ids(b.trainable_weights)
    head = model.get_layer("predictions")
    assert head.trainable and len(head.trainable_weights) == 2
    expected |= _ids(head.trainable_weights)
    assert _ids(model.trainable_weights) == expected
    # Every weight is somewhere: trainable + non-trainable = all.
    assert len(model.trainable_weights) + len(model.non_trainable_weights) == len(model.weights)


def test_negative_fine_tune_at_counts_from_the_end():
    m = tlkeras.build_model("ResNet50", 2, weights=None, input_shape=(32, 32, 3))
    blocks = tlkeras.blocks(m)
    assert tlkeras.apply_strategy(m, "partial", fine_tune_at=-1) == len(blocks) - 1
    assert [b.trainable for b in blocks] == [False] * (len(blocks) - 1) + [True]
    assert tlkeras.apply_strategy(m, "partial", fine_tune_at=-3) == len(blocks) - 3


def test_strategy_can_be_reapplied_on_the_same_model():
    m = tlkeras.build_model("MobileNetV2", 2, weights=None, input_shape=(32, 32, 3))
    assert not any(b.trainable for b in tlkeras.blocks(m))
    tlkeras.apply_strategy(m, "full")
    assert all(b.trainable for b in tlkeras.blocks(m))
    tlkeras.apply_strategy(m, "feature_extraction")
    assert not any(b.trainable for b in tlkeras.blocks(m))


@pytest.mark.parametrize(
    "strategy, k, message",
    [
        ("partial", None, "strategy 'partial' expects a block index"),
        ("full", 3, "only strategy 'partial' takes a block index"),
        ("feature_extraction", -1, "only strategy 'partial'"),
        ("finetune", None, "expected one of scratch, feature_extraction, partial, full"),
    ],
)
def test_strategy_argument_errors(strategy, k, message):
    m = tlkeras.build_model("MobileNet", 2, weights=None, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match=message):
        tlkeras.apply_strategy(m, strategy, fine_tune_at=k)


def test_parse_accepts_enum_and_spellings():
    assert Strategy.parse("Feature-Extraction") is Strategy.FEATURE_EXTRACTION
    assert Strategy.parse(Strategy.FULL) is Strategy.FULL
    assert [s.fine_tunes for s in Strategy] == [False, False, True, True]
    assert [s.pretrained for s in Strategy] == [False, True, True, True]


def _bn_layers(block):
    return [layer for layer in block.layers if isinstance(layer, keras.layers.BatchNormalization)]


def _train_one_step(model):
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical([0, 1, 0, 1], 2)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)


@pytest.mark.parametrize("backbone", ["MobileNetV2", "ResNet50", "EfficientNetB0"])
@pytest.mark.parametrize("train_bn", [False, True])
def test_batchnorm_rule(backbone, train_bn):
    m = tlkeras.build_model(
        backbone,
        2,
        weights=None,
        input_shape=(32, 32, 3),
        strategy="partial",
        fine_tune_at=-2,
        train_bn=train_bn,
    )
    blocks = tlkeras.blocks(m)
    frozen_bn = [bn for b in blocks[:-2] for bn in _bn_layers(b)]
    train_bn_layers = [bn for b in blocks[-2:] for bn in _bn_layers(b)]
    assert frozen_bn and train_bn_layers
    before = {id(bn): bn.moving_mean.numpy().copy() for bn in frozen_bn + train_bn_layers}
    _train_one_step(m)
    for bn in frozen_bn:  # frozen blocks: inference mode, statistics untouched
        np.testing.assert_array_equal(bn.moving_mean.numpy(), before[id(bn)])
    changed = [not np.array_equal(bn.moving_mean.numpy(), before[id(bn)]) for bn in train_bn_layers]
    # Default: statistics stay frozen even where the block trains; train_bn=True lets them move.
    assert any(changed) == train_bn
    assert all(bn.trainable == train_bn for bn in train_bn_layers)


@pytest.mark.slow
def test_keras_overrides_a_nested_training_false():
    """Why the BN rule uses trainable flags: the Keras guide's `base(x, training=False)` does not keep
    an unfrozen base's BN in inference mode under Keras 3 (the outer fit's training=True wins). If
    Keras changes this, the note in tlkeras.models.strategy must change too."""
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    base.trainable = True
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    m = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    bn = base.get_layer("bn_Conv1")
    before = bn.moving_mean.numpy().copy()
    _train_one_step(m)
    assert not np.array_equal(bn.moving_mean.numpy(), before)


@pytest.mark.slow
def test_scratch_trains_batchnorm_statistics():
    m = tlkeras.build_model(
        "MobileNetV2", 2, weights=None, input_shape=(32, 32, 3), strategy="scratch"
    )
    assert tlkeras.get_spec(m).train_bn
    bn = m.get_layer("backbone").get_layer("bn_Conv1")
    before = bn.moving_mean.numpy().copy()
    _train_one_step(m)
    assert not np.array_equal(bn.moving_mean.numpy(), before)


def test_scratch_phase_speeds_up_batchnorm_statistics():
    model = tlkeras.build_model(
        "MobileNet",
        3,
        strategy="scratch",
        weights=None,
        input_shape=(32, 32, 3),
        backbone_kwargs={"alpha": 0.25},
    )
    scratch_batchnorm(model)
    bns = [
        layer
        for layer in model.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns and all(b.momentum == SCRATCH_BN_MOMENTUM for b in bns)
    scratch_batchnorm(model, momentum=0.95)  # never raises a lowered momentum
    assert all(b.momentum == SCRATCH_BN_MOMENTUM for b in bns)
