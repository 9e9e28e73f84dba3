"""The fast frozen path: prefix/suffix split, prediction parity, cached features, fit_frozen."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tlkeras.fitting import fast_path, feature_cache, frozen
from tlkeras.models.blocks import blocks
from tlkeras.models.builder import AugmentConfig, build_model
from tlkeras.models.strategy import apply_strategy


def _model(name="MobileNet", size=32, augment=None, num_classes=3, **kwargs):
    backbone_kwargs = {"alpha": 0.25} if name == "MobileNet" else {}
    return build_model(
        name,
        num_classes,
        weights=None,
        input_shape=(size, size, 3),
        backbone_kwargs=backbone_kwargs,
        augment=augment,
        **kwargs,
    )


def _images(n=4, size=32, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _dataset(n=48, size=32, num_classes=3, batch_size=16, seed=0):
    x = _images(n, size, seed)
    y = keras.utils.to_categorical(np.arange(n) % num_classes, num_classes)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


@pytest.mark.parametrize(
    "name,size",
    [
        ("MobileNet", 32),
        ("ResNet50", 32),
        ("NASNetMobile", 32),  # cells read the two previous cells: several boundary tensors
        ("EfficientNetB0", 32),
        ("InceptionV3", 75),
    ],
)
def test_prediction_parity(name, size):
    model = _model(name, size)
    x = _images(size=size)
    # Random init gives near-constant features; perturb the head so parity is not trivially met.
    dense = model.get_layer("predictions")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel + np.random.RandomState(1).normal(0, 50, kernel.shape), bias])
    reference = model(x, training=False).numpy()
    n = len(blocks(model))
    for k in (None, n // 2):
        apply_strategy(model, "feature_extraction" if k is None else "partial", k)
        assert frozen.fast_path_plan(model, k).valid
        prefix, suffix = frozen.split_at_block(model, k)
        out = suffix(prefix(x, training=False), training=False).numpy()
        np.testing.assert_allclose(out, reference, atol=1e-5)
        # Shared layers: the suffix's trainable variables are the model's own.
        assert {id(v) for v in suffix.trainable_weights} <= {id(v) for v in model.trainable_weights}
        assert suffix.trainable_weights
    if name == "NASNetMobile":
        assert len(frozen.fast_path_plan(model, n // 2).boundary) > 1


def test_k_none_caches_pooled_features():
    model = _model()
    prefix, suffix = frozen.split_at_block(model, None)
    assert prefix.output.shape[1:] == (model.get_layer("pool").output.shape[-1],)
    assert frozen.fast_path_plan(model).boundary == ("pool",)


def test_plan_invalid_when_prefix_trains():
    model = _model(strategy="full")
    plan = frozen.fast_path_plan(model)
    assert not plan.valid and plan.mode == frozen.MODE_FULL_MODEL
    assert "trainable" in plan.reason
    apply_strategy(model, "partial", 3)
    assert not frozen.fast_path_plan(model, 4).valid  # block 3 trains but sits before k=4
    assert frozen.fast_path_plan(model, 3).valid
    assert frozen.fast_path_plan(model, 2).valid  # a frozen block may sit after the boundary


def test_plan_modes_with_augmentation():
    model = _model(augment=AugmentConfig())
    assert frozen.fast_path_plan(model).mode == frozen.MODE_CACHED_VIEWS
    assert frozen.fast_path_plan(model).augment_views == frozen.DEFAULT_AUGMENT_VIEWS
    assert frozen.fast_path_plan(model, augment_views=0).mode == frozen.MODE_CACHED_CLEAN
    assert frozen.fast_path_plan(_model()).mode == frozen.MODE_CACHED


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"augment_views": -1}, ValueError),
        ({"augment_views": 1.5}, ValueError),
        ({"fine_tune_at": 99}, ValueError),
        ({"fine_tune_at": "3"}, TypeError),
    ],
)
def test_plan_bad_arguments(kwargs, error):
    with pytest.raises(error, match="expected"):
        frozen.fast_path_plan(_model(), **kwargs)


def test_not_a_tlkeras_model():
    bare = keras.applications.MobileNet(
        alpha=0.25, include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    with pytest.raises(ValueError, match="expected a model from tlkeras.build_model"):
        frozen.fast_path_plan(bare)


def test_cache_features_views_and_memory_equivalence(tmp_path):
    model = _model(augment=AugmentConfig(flip="horizontal", rotation=0.0, zoom=0.0, contrast=0.0))
    prefix, _ = frozen.split_at_block(model, None)
    data = _dataset(n=20, batch_size=8)
    clean = feature_cache.cache_features(prefix, data)
    f, y = next(iter(clean))
    assert f.shape == (8, prefix.output.shape[-1]) and y.shape == (8, 3)
    expected = prefix(next(iter(data))[0], training=False).numpy()
    np.testing.assert_allclose(f.numpy(), expected, atol=1e-6)
    # The file-backed cache yields the same features.
    on_disk = feature_cache.cache_features(prefix, data, cache_dir=tmp_path)
    np.testing.assert_allclose(next(iter(on_disk))[0].numpy(), expected, atol=1e-6)
    assert any(tmp_path.iterdir())
    # Views: every example keeps its label; the features vary between passes (random view).
    viewed = feature_cache.cache_features(
        prefix, data, views=3, augmentation=model.get_layer("augmentation"), seed=1
    )
    assert sum(int(b[1].shape[0]) for b in viewed) == 20
    with pytest.raises(ValueError, match="expected an augmentation layer"):
        feature_cache.cache_features(prefix, data, views=2)
    with pytest.raises(ValueError, match="views"):
        feature_cache.cache_features(prefix, data, views=0)


@pytest.mark.parametrize("augment,k", [(AugmentConfig(), None), (None, -2)])
@pytest.mark.slow
def test_fit_frozen_trains_the_full_model(augment, k, tmp_path):
    model = _model(augment=augment)
    if k is not None:
        apply_strategy(model, "partial", k)
    bias_before = model.get_layer("predictions").get_weights()[1].copy()
    frozen_before = model.get_layer("backbone").layers[2].get_weights()[0].copy()
    data = _dataset()
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(self.model.name)

    best = tmp_path / "best.keras"
    history = fast_path.fit_frozen(
        model,
        data,
        data,
        epochs=2,
        optimizer=keras.optimizers.Adam(1e-2),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        fine_tune_at=k,
        callbacks=[
            Spy(),
            keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True),
            fast_path.SaveFullModel(model, best, monitor="val_loss", save_best_only=True),
        ],
        verbose=0,
    )
    expected_mode = frozen.MODE_CACHED_VIEWS if augment else frozen.MODE_CACHED
    assert history.fast_path["mode"] == expected_mode
    assert len(history.history["loss"]) == 2 and "val_accuracy" in history.history
    assert seen == ["suffix"]
    assert not np.allclose(model.get_layer("predictions").get_weights()[1], bias_before)
    np.testing.assert_array_equal(
        model.get_layer("backbone").layers[2].get_weights()[0], frozen_before
    )
    saved = keras.models.load_model(best)
    x = _images()
    np.testing.assert_allclose(saved.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_fit_frozen_falls_back_to_the_full_model():
    model = _model(strategy="full")
    # epochs=0: the routing is under test, not Keras's fit (an XLA compile of the whole backbone).
    history = fast_path.fit_frozen(
        model,
        _dataset(n=16),
        None,
        epochs=0,
        optimizer="adam",
        loss="categorical_crossentropy",
        verbose=0,
    )
    assert history.fast_path["mode"] == frozen.MODE_FULL_MODEL
    assert not history.fast_path["valid"]
    assert model.optimizer is not None and model.compiled  # compiled and fitted as a whole


def _val_loss_fit(model, train, validation, epochs, callbacks=(), **kwargs):
    return fast_path.fit_frozen(
        model,
        train,
        validation,
        epochs=epochs,
        optimizer=keras.optimizers.Adam(3e-2),
        loss="categorical_crossentropy",
        callbacks=list(callbacks),
        verbose=0,
        **kwargs,
    )


def test_save_full_model_defers_on_cached_features_and_records_the_saved_value(tmp_path):
    model = _model()
    saves = []
    original = model.save

    def counting_save(*args, **kwargs):
        saves.append(args[0])
        return original(*args, **kwargs)

    model.save = counting_save
    best = tmp_path / "best.keras"
    checkpoint = fast_path.SaveFullModel(model, best, monitor="val_loss", save_best_only=True)
    stopping = keras.callbacks.EarlyStopping(patience=50, restore_best_weights=True)
    history = _val_loss_fit(model, _dataset(), _dataset(seed=1), 6, [stopping, checkpoint], seed=0)
    assert checkpoint.defers  # Keras handed it the suffix
    assert len(saves) == 1  # once, at the end, not at every improving epoch
    record = json.loads((tmp_path / "best.keras.json").read_text())
    losses = history.history["val_loss"]
    assert record["value"] == pytest.approx(min(losses))
    assert record["epoch"] == int(np.argmin(losses)) + 1
    assert fast_path.saved_value(best) == pytest.approx(min(losses))
    # The saved model is the best epoch's, which EarlyStopping restored in memory.
    x = _images()
    saved = keras.models.load_model(best)
    np.testing.assert_allclose(saved.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_save_full_model_saves_at_once_when_the_full_model_trains(tmp_path):
    model = _model(strategy="full")
    best = tmp_path / "best.keras"
    checkpoint = fast_path.SaveFullModel(model, best, monitor="loss", save_best_only=True)
    checkpoint.set_model(model)
    assert not checkpoint.defers
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    checkpoint.on_train_begin()
    checkpoint.on_epoch_end(0, {"loss": 0.7})
    assert best.is_file() and fast_path.saved_value(best) == pytest.approx(0.7)
    checkpoint.on_epoch_end(1, {"loss": 0.9})  # no improvement: the record stays
    assert fast_path.saved_value(best) == pytest.approx(0.7)
    assert fast_path.saved_value(tmp_path / "missing.keras") is None


def test_best_epochs_counts_to_the_lowest_validation_loss():
    history = keras.callbacks.History()
    history.history = {"loss": [1, 1, 1, 1], "val_loss": [0.9, 0.5, float("nan"), 0.7]}
    history.epoch = [3, 4, 5, 6]  # the phase started at epoch 3 (earlier phases)
    assert fast_path.best_epochs(history, initial_epoch=3) == 2
    history.history = {"loss": [1.0, 0.9, 0.8]}
    assert fast_path.best_epochs(history) == 3  # no validation: every epoch


@pytest.mark.parametrize("augment", [None, AugmentConfig()])
def test_refit_retrains_from_the_start_on_train_and_validation(augment):
    train, validation = _dataset(n=48), _dataset(n=24, seed=1)
    model = _model(augment=augment)
    start = [w.copy() for w in model.get_layer("predictions").get_weights()]
    stopping = keras.callbacks.EarlyStopping(patience=50, restore_best_weights=True)
    history = _val_loss_fit(
        model,
        train,
        validation,
        5,
        [stopping],
        refit_optimizer=lambda: keras.optimizers.Adam(3e-2),
    )
    best = stopping.best_weights
    refit = history.fast_path["refit"]
    assert refit == {"epochs": fast_path.best_epochs(history), "examples": 48 + 24}
    # Not the best-validation weights any more, and not the start either: retrained.
    head = model.get_layer("predictions").get_weights()
    assert not all(np.allclose(a, b) for a, b in zip(head, start, strict=True))
    suffix_best = [np.asarray(w) for w in best[-2:]]
    assert not all(np.allclose(a, b) for a, b in zip(head, suffix_best, strict=True))


def test_refit_needs_validation_and_the_fast_path():
    history = _val_loss_fit(
        _model(), _dataset(), None, 2, refit_optimizer=lambda: keras.optimizers.Adam(1e-2)
    )
    assert "refit" not in history.fast_path


def test_clean_and_augmented_views_share_one_trace():
    model = _model(augment=AugmentConfig(flip="horizontal", rotation=0.0, zoom=0.0, contrast=0.0))
    prefix, _ = frozen.split_at_block(model, None)
    augmentation = model.get_layer("augmentation")
    images = next(iter(_dataset(n=8, batch_size=8)))[0]
    with_views = feature_cache._feature_function(prefix, augmentation)
    # A clean-only caller (the validation pass) reuses the augmenting function: one trace in all.
    assert feature_cache._feature_function(prefix, None) is with_views
    features_of = feature_cache._features_fn(prefix, augmentation)
    clean = features_of(images, False)
    np.testing.assert_allclose(clean, prefix(images, training=False), atol=1e-6)
    flipped = prefix(tf.reverse(images, axis=[2]), training=False).numpy()
    augmented = np.asarray(features_of(images, True))
    # Every image is either kept or flipped.
    kept = np.all(np.isclose(augmented, clean, atol=1e-5), axis=1)
    turned = np.all(np.isclose(augmented, flipped, atol=1e-5), axis=1)
    assert np.all(kept | turned)
    assert with_views.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("solver", ["gradient", "lbfgs"])
def test_features_spill_to_files_when_memory_is_short(monkeypatch, caplog, solver):
    """Past the memory budget (forced tiny here) the features go to files and the head trains on
    them: the same result as in memory."""
    data = _dataset(n=24, batch_size=8)
    results = {}
    for name, budget in (("kept", feature_cache.MEMORY_FRACTION), ("spilled", 1e-12)):
        monkeypatch.setattr(feature_cache, "MEMORY_FRACTION", budget)
        keras.utils.set_random_seed(0)
        model = _model()
        with caplog.at_level("WARNING", logger=feature_cache.__name__):
            history = _val_loss_fit(model, data, data, 2, solver=solver)
        results[name] = (history, model.get_layer("predictions").get_weights()[0])
    spilled, kept = results["spilled"], results["kept"]
    assert "caching to files instead" in caplog.text
    assert spilled[0].fast_path["mode"] == frozen.MODE_CACHED
    # The L-BFGS head needs its features in memory: spilled, it trains by gradient epochs.
    if solver == "lbfgs":
        assert kept[0].fast_path["solver"]["method"] == "lbfgs"
        assert spilled[0].fast_path["solver"]["method"] == "gradient"
    else:
        np.testing.assert_allclose(spilled[1], kept[1], rtol=1e-4, atol=1e-5)
