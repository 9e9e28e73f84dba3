"""Tests for tlkeras.fitting.optimizers: per-block learning rates, schedules, serialization and EMA."""

import keras
import numpy as np
import pytest
from conftest import small_input

import tlkeras
from tlkeras.fitting import optimizers as opt_lib
from tlkeras.fitting.optimizers import (
    OPTIMIZERS,
    SwapEMAWeights,
    block_lr_multipliers,
    make_optimizer,
    phase_schedule,
)
from tlkeras.models.blocks import get_backbone_model

SMALL = {"weights": None, "input_shape": (32, 32, 3), "backbone_kwargs": {"alpha": 0.25}}


@pytest.fixture(scope="module")
def mobilenet():
    return tlkeras.build_model("MobileNet", 3, **SMALL)


def _kernel(model, block_index):
    block = tlkeras.blocks(model)[block_index]
    return next(v for layer in block.layers for v in layer.weights if v.name == "kernel")


# ---------------------------------------------------------------------------------------------
# The multipliers table


@pytest.mark.parametrize(
    "backbone, kwargs",
    [("MobileNet", {"alpha": 0.25}), ("ResNet50", {}), ("EfficientNetB0", {})],
)
def test_block_multipliers_decay_from_the_head_down_to_the_stem(backbone, kwargs):
    model = tlkeras.build_model(
        backbone, 3, weights=None, input_shape=small_input(backbone), backbone_kwargs=kwargs
    )
    table = block_lr_multipliers(model, 0.5)  # also checks that the paths are unique
    # Every weight that can train has an entry, frozen or not right now: the same table as with
    # everything unfrozen (BN and input-normalisation statistics have none).
    tlkeras.apply_strategy(model, "full", train_bn=True)
    assert set(table) == {v.path for v in model.trainable_weights}
    assert block_lr_multipliers(model, 0.5) == table
    all_blocks = tlkeras.blocks(model)
    n = len(all_blocks)
    backbone_paths = {v.path for v in get_backbone_model(model).weights}
    for path, scale in table.items():
        if path not in backbone_paths:
            assert scale == 1.0, path  # the head
    for block in all_blocks:
        got = {table[v.path] for layer in block.layers for v in layer.weights if v.path in table}
        assert got <= {0.5 ** (n - block.index)}, block
    assert table[_kernel(model, n - 1).path] == 0.5
    assert min(table.values()) == 0.5**n
    assert set(block_lr_multipliers(model, 1.0).values()) == {1.0}


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5, True, "0.5"])
def test_block_multipliers_refuse_a_decay_outside_0_1(mobilenet, decay):
    with pytest.raises(ValueError, match=r"expected a number in \(0, 1\], received"):
        block_lr_multipliers(mobilenet, decay)


# ---------------------------------------------------------------------------------------------
# Per-variable steps


@pytest.mark.parametrize("loss_scale", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_one_step_moves_each_block_by_its_multiplier(mobilenet, name, weight_decay, loss_scale):
    table = block_lr_multipliers(mobilenet, 0.8)
    n = len(tlkeras.blocks(mobilenet))
    low, high = _kernel(mobilenet, n - 3), _kernel(mobilenet, n - 1)  # steps well above float eps
    expected = table[low.path] / table[high.path]
    assert expected == pytest.approx(0.8**2)
    saved = [np.array(low.numpy()), np.array(high.numpy())]
    try:
        low.assign(np.ones(low.shape, "float32"))
        high.assign(np.ones(high.shape, "float32"))
        optimizer = make_optimizer(name, 0.05, weight_decay, lr_multipliers=table)
        if loss_scale:  # what mixed_float16 compiles to
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=1.0)
        grads = [np.full(v.shape, 0.2, "float32") for v in (low, high)]
        optimizer.apply_gradients(zip(grads, [low, high], strict=True))
        d_low, d_high = (np.abs(1.0 - v.numpy()) for v in (low, high))
        # Identical gradients and values: every element of a variable moves by the same step.
        assert d_high.min() > 0 and np.ptp(d_low) < 1e-6 and np.ptp(d_high) < 1e-6
        assert d_low.mean() / d_high.mean() == pytest.approx(expected, rel=1e-4)
    finally:
        low.assign(saved[0])
        high.assign(saved[1])


def test_without_multipliers_and_for_kernels_only_the_decay_applies():
    kernel = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    bias = keras.Variable(np.ones((2,), "float32"), name="bias")
    for name in OPTIMIZERS:
        kernel.assign(np.ones((2, 2)))
        bias.assign(np.ones(2))
        optimizer = make_optimizer(name, 0.1, 0.5)
        # A zero gradient: the optimizer's own step is 0, so any change is the weight decay.
        optimizer.apply_gradients([(np.zeros((2, 2), "float32"), kernel), (np.zeros(2), bias)])
        np.testing.assert_allclose(kernel.numpy(), 1 - 0.1 * 0.5, rtol=1e-6)
        np.testing.assert_allclose(bias.numpy(), 1.0)


def test_make_optimizer_builds_each_kind_and_refuses_other_names():
    adamw = make_optimizer("adamw", 1e-3, 1e-4)
    sgd = make_optimizer("sgd", 1e-2, 1e-4, ema=True, ema_momentum=0.9)
    assert isinstance(adamw, keras.optimizers.AdamW) and isinstance(adamw, opt_lib.AdamW)
    assert isinstance(sgd, keras.optimizers.SGD) and (sgd.momentum, sgd.nesterov) == (0.9, True)
    assert (sgd.use_ema, sgd.ema_momentum, adamw.use_ema) == (True, 0.9, False)
    for bad in ["adam", "AdamW", "", None]:
        with pytest.raises(ValueError, match="optimizer: expected one of adamw, sgd, received"):
            make_optimizer(bad, 1e-3, 0.0)
    with pytest.raises(ValueError, match="lr_multipliers: expected numbers > 0"):
        make_optimizer("adamw", 1e-3, 0.0, lr_multipliers={"a/kernel": 0.0})


# ---------------------------------------------------------------------------------------------
# Schedules


def _at(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    schedule = phase_schedule(0.1, schedule="cosine", total_steps=100, warmup_steps=10)
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    assert 0 < _at(schedule, 0) <= 0.1 / 10 + 1e-9  # ~0
    assert _at(schedule, 5) == pytest.approx((_at(schedule, 0) + 0.1) / 2, rel=1e-5)
    assert _at(schedule, 10) == pytest.approx(0.1, rel=1e-6)
    assert _at(schedule, 55) == pytest.approx(0.05, rel=1e-5)
    assert _at(schedule, 100) == pytest.approx(0.0, abs=1e-9)
    plain = phase_schedule(0.1, schedule="cosine", total_steps=10, warmup_steps=0)
    assert (_at(plain, 0), _at(plain, 10)) == (pytest.approx(0.1), pytest.approx(0.0, abs=1e-9))
    assert phase_schedule(0.1, schedule="constant", total_steps=10, warmup_steps=0) == 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "step"}, "schedule: expected one of constant, cosine, received 'step'"),
        ({"schedule": "constant", "warmup_steps": 2}, "expected 0 with schedule='constant'"),
        ({"warmup_steps": 10}, "warmup_steps: expected fewer than total_steps=10, received 10"),
        ({"total_steps": -1}, "total_steps: expected an int >= 0, received -1"),
    ],
)
def test_phase_schedule_refuses_bad_arguments(kwargs, match):
    args = {"schedule": "cosine", "total_steps": 10, "warmup_steps": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        phase_schedule(0.1, **args)


# ---------------------------------------------------------------------------------------------
# Serialization


def _tiny_model():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(x))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_config_round_trips_and_a_saved_model_reloads(name, tmp_path):
    table = {"hidden/kernel": 0.25, "hidden/bias": 0.25, "out/kernel": 1.0, "out/bias": 1.0}
    schedule = phase_schedule(0.1, schedule="cosine", total_steps=20, warmup_steps=2)
    optimizer = make_optimizer(name, schedule, 1e-3, lr_multipliers=table, ema=True)
    config = keras.optimizers.serialize(optimizer)
    again = keras.optimizers.deserialize(config)
    assert type(again) is type(optimizer)
    ours, theirs = optimizer.get_config(), again.get_config()
    assert {**ours, "name": None} == {**theirs, "name": None}
    assert again._lr_multipliers == table and again._no_decay_names == list(opt_lib.NO_DECAY)

    model = _tiny_model()
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.ones((8, 4)), np.zeros((8, 2)), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is type(optimizer)
    assert loaded.optimizer._lr_multipliers == table and loaded.optimizer.use_ema
    assert int(loaded.optimizer.iterations.numpy()) == 1
    loaded.fit(np.ones((8, 4)), np.zeros((8, 2)), epochs=1, verbose=0)  # trains on


# ---------------------------------------------------------------------------------------------
# EMA


class _Record(keras.callbacks.Callback):
    """Placed after SwapEMAWeights: the weights the other callbacks see at each epoch's end."""

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        self.seen, self.stop_at = [], stop_at

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append([np.array(w) for w in self.model.get_weights()])
        if epoch == self.stop_at:
            self.model.stop_training = True


def _ema_fit(callbacks, epochs=4):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    model.compile(
        optimizer=make_optimizer("adamw", 0.05, 0.0, ema=True, ema_momentum=0.5), loss="mse"
    )
    x, y = np.random.default_rng(0).normal(size=(32, 4)), np.ones((32, 2))
    model.fit(x, y, batch_size=8, epochs=epochs, callbacks=callbacks, verbose=0)
    return model


@pytest.mark.parametrize("stop_at", [None, 1])
def test_swap_ema_weights_leaves_the_ema_weights_in_the_model(stop_at):
    record = _Record(stop_at)
    model = _ema_fit([SwapEMAWeights(), record])
    assert len(record.seen) == (4 if stop_at is None else stop_at + 1)
    # What the callbacks saw at the last epoch's end (the EMA weights) is the final model, also
    # when the fit stops early (Keras's own callback would leave the raw weights there then).
    for final, seen in zip(model.get_weights(), record.seen[-1], strict=True):
        np.testing.assert_array_equal(final, seen)
    averages = model.optimizer._model_variables_moving_average
    for variable, average in zip(model.optimizer._trainable_variables, averages, strict=True):
        np.testing.assert_array_equal(variable.numpy(), average.numpy())


def test_swap_ema_weights_resumes_a_backup_with_the_raw_weights(tmp_path):
    backup = str(tmp_path / "backup")
    stop = _Record(stop_at=1)
    _ema_fit(
        [SwapEMAWeights(), stop, keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)]
    )
    # A new process: a fresh model and optimizer resume from the backup of epoch 2.
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    model.compile(
        optimizer=make_optimizer("adamw", 0.05, 0.0, ema=True, ema_momentum=0.5), loss="mse"
    )

    class Begin(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not hasattr(self, "weights_at_begin"):
                self.optimizer_ = self.model.optimizer
                self.weights_at_begin = [np.array(v.numpy()) for v in self.model.trainable_weights]
                self.averages = [
                    np.array(v.numpy())
                    for v in self.model.optimizer._model_variables_moving_average
                ]

    begin = Begin()
    x, y = np.random.default_rng(0).normal(size=(32, 4)), np.ones((32, 2))
    callbacks = [SwapEMAWeights(), begin, keras.callbacks.BackupAndRestore(backup)]
    model.fit(x, y, batch_size=8, epochs=4, callbacks=callbacks, verbose=0)
    # The backup was written with the EMA weights swapped into the model; training resumes from
    # the raw weights, the averages from the EMA ones (what the model held at the backup).
    saved_ema = stop.seen[-1]
    for average, ema in zip(begin.averages, saved_ema, strict=True):
        np.testing.assert_allclose(average, ema)
    assert any(
        not np.allclose(w, e) for w, e in zip(begin.weights_at_begin, saved_ema, strict=True)
    )
