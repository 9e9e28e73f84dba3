"""Augmentation presets: the in-model layers of each, batch mixing, the fast path's cached views."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tlkeras.data import augment
from tlkeras.fitting import feature_cache, frozen
from tlkeras.models.builder import build_model
from tlkeras.models.spec import PRESETS, AugmentConfig, HeadConfig, ModelSpec, get_spec
from tlkeras.models.strategy import apply_strategy
from tlkeras.models.task import encode_labels, loss_for, metrics_for

SIZE = 32


def _model(augment_config, task="multiclass", num_classes=3):
    return build_model(
        "MobileNet",
        num_classes,
        weights=None,
        input_shape=(SIZE, SIZE, 3),
        backbone_kwargs={"alpha": 0.25},
        head=HeadConfig(task=task),
        augment=augment_config,
    )


def _images(n=8, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _int_labels(task, n=8, num_classes=3):
    if task == "multilabel":
        return (np.random.RandomState(1).uniform(size=(n, num_classes)) > 0.5).astype("float32")
    return np.arange(n) % (2 if task == "binary" else num_classes)


def _encoded(task, n=8, batch_size=4, num_classes=3):
    raw = tf.data.Dataset.from_tensor_slices((_images(n), _int_labels(task, n, num_classes)))
    return encode_labels(raw.batch(batch_size), task, num_classes)


def _layer_summary(sequential):
    return [(type(layer).__name__, layer.get_config()) for layer in sequential.layers]


def test_presets_and_help_agree():
    assert augment.PRESETS == PRESETS == ("light", "strong", "mixup", "cutmix")
    assert tuple(augment.PRESET_HELP) == PRESETS
    assert all(isinstance(v, str) and v and "\n" not in v for v in augment.PRESET_HELP.values())


def test_bad_preset_is_refused():
    with pytest.raises(ValueError, match=r"AugmentConfig.preset: expected one of .*'heavy'"):
        AugmentConfig(preset="heavy")


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_builds_a_training_only_sequential(preset):
    seq = AugmentConfig(seed=0, preset=preset).build()
    assert seq.name == "augmentation"
    out = seq(_images(2), training=False)
    np.testing.assert_allclose(out, _images(2))


def test_light_and_the_mixing_presets_build_todays_layers():
    # The layer list tlkeras built before presets existed (AugmentConfig(seed=...) means light).
    L = keras.layers
    today = keras.Sequential(
        [
            L.RandomFlip("horizontal", seed=3, name="random_flip"),
            L.RandomRotation(0.1, fill_mode="reflect", seed=3, name="random_rotation"),
            L.RandomZoom(0.1, fill_mode="reflect", seed=3, name="random_zoom"),
            L.RandomContrast(0.1, value_range=(0, 255), seed=3, name="random_contrast"),
        ],
        name="augmentation",
    )
    assert AugmentConfig(seed=3).preset == "light"
    for preset in ("light", "mixup", "cutmix"):
        built = AugmentConfig(seed=3, preset=preset).build()
        assert _layer_summary(built) == _layer_summary(today)


def test_strong_changes_images_in_training_and_is_identity_at_inference():
    seq = AugmentConfig(seed=0, preset="strong").build()
    names = [layer.name for layer in seq.layers]
    assert names == ["random_flip", "rand_augment"]
    rand = seq.get_layer("rand_augment")
    assert isinstance(rand, keras.layers.RandAugment) and tuple(rand.value_range) == (0, 255)
    x = _images(8)
    out = np.asarray(seq(x, training=True))
    flipped = x[:, :, ::-1, :]
    # Not only flips: some image differs from both itself and its mirror image.
    changed = [
        not np.allclose(o, a, atol=1e-3) and not np.allclose(o, f, atol=1e-3)
        for o, a, f in zip(out, x, flipped, strict=True)
    ]
    assert any(changed)
    assert out.shape == x.shape and np.isfinite(out).all()
    np.testing.assert_allclose(seq(x, training=False), x)


@pytest.mark.parametrize("preset", ["light", "strong", None])
def test_batch_mixer_is_none_without_mixing(preset):
    config = None if preset is None else AugmentConfig(preset=preset)
    assert augment.batch_mixer(config, "multiclass") is None
    assert not augment.mixes_batches(config)


@pytest.mark.parametrize("preset", ["mixup", "cutmix"])
@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_batch_mixer_mixes_images_and_soft_labels(preset, task):
    data = _encoded(task, n=32, batch_size=16)
    mixer = augment.batch_mixer(AugmentConfig(seed=0, preset=preset), task)
    assert mixer is not None
    before = list(data)
    after = list(mixer(data))
    assert len(after) == len(before)
    soft = False
    images_mixed = False
    for (x0, y0), (x1, y1) in zip(before, after, strict=True):
        assert x1.shape == x0.shape and y1.shape == y0.shape
        assert x1.dtype == tf.float32 and y1.dtype == tf.float32
        y1 = y1.numpy()
        assert np.all(y1 >= -1e-6) and np.all(y1 <= 1 + 1e-6)
        if task == "multiclass":
            np.testing.assert_allclose(y1.sum(axis=1), 1.0, atol=1e-5)
        soft |= bool(np.any((y1 > 1e-3) & (y1 < 1 - 1e-3)))
        images_mixed |= not np.allclose(x1.numpy(), x0.numpy())
    assert images_mixed
    assert soft  # some label is a blend, not a hard 0/1


def test_batch_mixer_keeps_sample_weights_and_checks_the_task():
    x, y, w = _images(8), tf.one_hot(np.arange(8) % 3, 3), np.linspace(0.5, 1.0, 8)
    data = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4)
    mixer = augment.batch_mixer(AugmentConfig(seed=0, preset="mixup"), "multiclass")
    out = list(mixer(data))
    np.testing.assert_allclose(np.concatenate([e[2] for e in out]), w)
    with pytest.raises(ValueError, match="task"):
        augment.batch_mixer(AugmentConfig(preset="mixup"), "regression")


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_the_losses_take_soft_labels(task):
    # tlkeras.models.task.loss_for is categorical / binary cross-entropy: dense targets, soft ones fine.
    loss = loss_for(task)
    assert not isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    units = 1 if task == "binary" else 3
    y = tf.fill([2, units], 0.5 if task != "multiclass" else 1 / 3)
    p = tf.fill([2, units], 0.5 if task != "multiclass" else 1 / 3)
    assert np.isfinite(float(loss(y, p)))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.slow
def test_a_tiny_model_trains_with_each_preset(preset):
    task = "binary" if preset == "cutmix" else "multiclass"  # both label shapes through fit
    num_classes = 2 if task == "binary" else 3
    config = AugmentConfig(seed=0, preset=preset)
    model = _model(config, task=task, num_classes=num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=loss_for(task),
        metrics=metrics_for(task),
    )
    data = _encoded(task, n=8, batch_size=4, num_classes=num_classes)
    mixer = augment.batch_mixer(config, task)
    train = mixer(data) if mixer else data
    history = model.fit(train, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert get_spec(model).augment.preset == preset


def test_the_fast_path_caches_strong_views():
    model = _model(AugmentConfig(seed=0, preset="strong"))
    apply_strategy(model, "feature_extraction")
    plan = frozen.fast_path_plan(model)
    assert plan.mode == frozen.MODE_CACHED_VIEWS
    assert "strong" in plan.augmentation and "strong" in plan.describe()
    prefix, _ = frozen.split_at_block(model, None)
    data = _encoded("multiclass", n=8, batch_size=4)
    arrays = feature_cache.feature_arrays(
        prefix, data, views=2, augmentation=model.get_layer("augmentation")
    )
    assert arrays is not None and len(arrays.views) == 2
    clean, augmented = arrays.views
    assert clean.shape == augmented.shape and np.isfinite(augmented).all()
    assert not np.allclose(clean, augmented, rtol=1e-3, atol=0)  # random init: tiny features


@pytest.mark.parametrize(
    "config,expected",
    [
        (None, None),
        (AugmentConfig(), "cached views of the light augmentation"),
        (AugmentConfig(preset="strong"), "cached views of the strong augmentation"),
        (AugmentConfig(preset="mixup"), "light augmentation (mixup is applied only end to end)"),
        (AugmentConfig(preset="cutmix"), "light augmentation (cutmix is applied only end to end)"),
    ],
)
def test_fast_path_note(config, expected):
    note = augment.fast_path_note(config)
    assert note == expected if expected is None else expected in note


def test_the_fast_path_plan_says_mixing_is_end_to_end_only():
    model = _model(AugmentConfig(seed=0, preset="mixup"))
    apply_strategy(model, "feature_extraction")
    plan = frozen.fast_path_plan(model)
    assert "mixup is applied only end to end" in plan.describe()
    assert frozen.fast_path_plan(model, augment_views=0).augmentation is None


@pytest.mark.parametrize("preset", PRESETS)
def test_model_spec_round_trip_with_a_preset(preset):
    spec = ModelSpec(
        backbone="MobileNet",
        num_classes=3,
        input_shape=(SIZE, SIZE, 3),
        strategy="feature_extraction",
        augment=AugmentConfig(seed=1, preset=preset),
    )
    d = spec.to_dict()
    assert d["augment"]["preset"] == preset
    assert ModelSpec.from_dict(d) == spec


def test_an_old_spec_without_a_preset_loads_as_light():
    spec = ModelSpec(
        backbone="MobileNet",
        num_classes=3,
        input_shape=(SIZE, SIZE, 3),
        strategy="feature_extraction",
        augment=AugmentConfig(seed=1),
    )
    old = spec.to_dict()
    del old["augment"]["preset"]
    loaded = ModelSpec.from_dict(old)
    assert loaded.augment.preset == "light" and loaded == spec


def test_a_strong_model_saves_and_loads(tmp_path):
    model = _model(AugmentConfig(seed=0, preset="strong"))
    path = tmp_path / "strong.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert get_spec(loaded).augment.preset == "strong"
    x = _images(2)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-5)
    assert isinstance(
        loaded.get_layer("augmentation").get_layer("rand_augment"), keras.layers.RandAugment
    )


@pytest.mark.parametrize("preset", ["mixup", "cutmix"])
def test_batch_mixer_mixes_anew_each_epoch_and_is_seeded(preset):
    def first_labels(mixer):
        return next(iter(mixer(_encoded("multiclass", n=16, batch_size=16))))[1].numpy()

    mixer = augment.batch_mixer(AugmentConfig(seed=0, preset=preset), "multiclass")
    epoch1, epoch2 = first_labels(mixer), first_labels(mixer)
    assert not np.allclose(epoch1, epoch2)
    again = augment.batch_mixer(AugmentConfig(seed=0, preset=preset), "multiclass")
    np.testing.assert_allclose(first_labels(again), epoch1)
