"""Tests for tlkeras.fitting.config, plan and runner: TrainConfig, the phase plan, the one runner."""

import dataclasses
import json

import keras
import numpy as np
import pytest
from tensorflow.python.framework import config as tf_framework_config

import tlkeras
from tlkeras.data import sources as data_lib
from tlkeras.fitting import config as config_lib
from tlkeras.fitting import fast_path, runner
from tlkeras.fitting.config import FEATURE_EXTRACTION, FULL, PARTIAL, SCRATCH, Phase, TrainConfig
from tlkeras.fitting.plan import plan_phases
from tlkeras.fitting.runner import LossNotFinite, run_phase
from tlkeras.models.strategy import SCRATCH_BN_MOMENTUM
from tlkeras.models.task import encode_labels

SMALL = {"weights": None, "input_shape": (32, 32, 3), "backbone_kwargs": {"alpha": 0.25}}


@pytest.fixture(scope="module")
def digits():
    return data_lib.load("digits:0-2", image_size=(32, 32), batch_size=32, seed=0)


def _datasets(data):
    return encode_labels(data.train, "multiclass", 3), encode_labels(
        data.validation, "multiclass", 3
    )


# ---------------------------------------------------------------------------------------------
# TrainConfig


def test_config_defaults_and_fine_tune_learning_rate():
    c = TrainConfig()
    assert (c.epochs, c.fine_tune_epochs, c.learning_rate, c.weight_decay) == (10, 10, 1e-3, 1e-4)
    assert c.resolved_fine_tune_learning_rate == pytest.approx(1e-4)
    assert TrainConfig(fine_tune_learning_rate=3e-5).resolved_fine_tune_learning_rate == 3e-5
    as_dict = TrainConfig(class_weight={0: 1.0, 1: 2.0}).to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # run_state.json stores it: strict JSON
    assert as_dict["class_weight"] == {"0": 1.0, "1": 2.0}


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"epochs": -1}, ValueError),
        ({"fine_tune_epochs": -3}, ValueError),
        ({"epochs": 0, "fine_tune_epochs": 0}, ValueError),
        ({"epochs": 2.5}, TypeError),
        ({"epochs": True}, TypeError),
        ({"learning_rate": 0.0}, ValueError),
        ({"learning_rate": float("nan")}, ValueError),
        ({"fine_tune_learning_rate": -1e-4}, ValueError),
        ({"label_smoothing": 1.0}, ValueError),
        ({"batch_size": 0}, ValueError),
        ({"class_weight": "balanced"}, ValueError),
        ({"class_weight": {0: -1.0}}, ValueError),
        ({"class_weight": [1.0, 2.0]}, TypeError),
        ({"fast": "yes"}, TypeError),
        ({"converge_head": 1}, TypeError),
        ({"refit": None}, TypeError),
        ({"augment_views": -1}, ValueError),
        ({"head_solver": "adam"}, ValueError),
        ({"optimizer": "adam"}, ValueError),
        ({"layer_decay": 0.0}, ValueError),
        ({"layer_decay": 1.5}, ValueError),
        ({"layer_decay": "0.5"}, ValueError),
        ({"schedule": "step"}, ValueError),
        ({"warmup_epochs": -1, "schedule": "cosine"}, ValueError),
        ({"warmup_epochs": 1.0, "schedule": "cosine"}, TypeError),
        ({"warmup_epochs": 1, "schedule": "constant"}, ValueError),  # warm-up needs a cosine
        ({"reduce_lr_on_plateau": True, "schedule": "cosine"}, ValueError),
        ({"ema": 1}, TypeError),
        ({"ema_momentum": 1.0}, ValueError),
        ({"ema_momentum": 0.0}, ValueError),
        ({"unfreeze_stages": 0}, ValueError),
        ({"unfreeze_stages": 2.0}, TypeError),
        ({"unfreeze_stages": 4, "fine_tune_epochs": 3}, ValueError),
    ],
)
def test_config_rejects_bad_values_with_expected_received(kwargs, error):
    with pytest.raises(error, match=r"TrainConfig.*: expected .* received"):
        TrainConfig(**kwargs)


def test_config_refuses_a_plateau_rule_on_a_schedule():
    with pytest.raises(ValueError, match="reduce_lr_on_plateau: expected False with schedule="):
        TrainConfig(reduce_lr_on_plateau=True, schedule="cosine")
    TrainConfig(reduce_lr_on_plateau=True)  # the constant learning rate it can halve
    c = TrainConfig()
    assert (c.optimizer, c.layer_decay, c.schedule, c.warmup_epochs) == (
        "adamw",
        1.0,
        "auto",
        0,
    )
    TrainConfig(reduce_lr_on_plateau=True, schedule="auto")  # auto: constant under plateaus
    assert (c.ema, c.ema_momentum, c.unfreeze_stages) == (False, 0.99, 1)


# ---------------------------------------------------------------------------------------------
# The plan


@pytest.mark.parametrize(
    "strategy, fine_tune_at, expected",
    [
        (SCRATCH, None, [("scratch", SCRATCH, None, 1e-3, 5)]),
        (FEATURE_EXTRACTION, None, [("head warm-up", FEATURE_EXTRACTION, None, 1e-3, 2)]),
        (
            PARTIAL,
            -2,
            [
                ("head warm-up", FEATURE_EXTRACTION, None, 1e-3, 2),
                ("fine-tuning", PARTIAL, -2, 1e-4, 3),
            ],
        ),
        (
            FULL,
            None,
            [
                ("head warm-up", FEATURE_EXTRACTION, None, 1e-3, 2),
                ("fine-tuning", FULL, None, 1e-4, 3),
            ],
        ),
    ],
)
def test_plan_for_every_strategy(strategy, fine_tune_at, expected):
    phases = plan_phases(strategy, fine_tune_at, TrainConfig(epochs=2, fine_tune_epochs=3))
    got = [(p.name, p.strategy, p.fine_tune_at, p.learning_rate, p.epochs) for p in phases]
    assert got == [(n, s, k, pytest.approx(lr), e) for n, s, k, lr, e in expected]
    assert all(p.weight_decay == TrainConfig().weight_decay for p in phases)
    # What keeps a frozen prefix may train on cached features: the head warm-up and `partial`
    # fine-tuning (to its block boundary); `full` and `scratch` train on the images.
    assert [p.fast for p in phases] == [p.strategy in (FEATURE_EXTRACTION, PARTIAL) for p in phases]


def test_plan_uses_the_recipe_settings_and_fine_tunes_only_with_decay_and_ema():
    config = TrainConfig(
        epochs=2,
        fine_tune_epochs=3,
        optimizer="sgd",
        layer_decay=0.7,
        schedule="cosine",
        warmup_epochs=1,
        ema=True,
        ema_momentum=0.9,
    )
    head, tune = plan_phases(PARTIAL, -2, config)
    for p in (head, tune):
        assert (p.optimizer_name, p.schedule, p.warmup_epochs) == ("sgd", "cosine", 1)
    assert (head.layer_decay, head.ema) == (1.0, False)
    assert (tune.layer_decay, tune.ema, tune.ema_momentum) == (0.7, True, 0.9)
    (scratch,) = plan_phases(SCRATCH, None, config)
    assert (scratch.layer_decay, scratch.ema, scratch.schedule) == (1.0, False, "cosine")
    with pytest.raises(
        ValueError, match="warmup_epochs: expected fewer than the 2 epochs of phase"
    ):
        plan_phases(FULL, None, dataclasses.replace(config, warmup_epochs=2, fine_tune_epochs=5))


@pytest.mark.parametrize(
    "strategy, fine_tune_at, stages, epochs, expected",
    [
        # 14 blocks; partial at -4 unfreezes blocks 10..13 in groups [10, 11], [12], [13].
        (PARTIAL, -4, 3, 7, [(PARTIAL, 13, 2), (PARTIAL, 12, 2), (PARTIAL, -4, 3)]),
        (PARTIAL, 12, 2, 2, [(PARTIAL, 13, 1), (PARTIAL, 12, 1)]),
        # full: blocks 0..13 in groups [0..4], [5..9], [10..13]; the last stage is `full` itself.
        (FULL, None, 3, 10, [(PARTIAL, 10, 3), (PARTIAL, 5, 3), (FULL, None, 4)]),
    ],
)
def test_plan_unfreezes_gradually_top_down(strategy, fine_tune_at, stages, epochs, expected):
    config = TrainConfig(epochs=1, fine_tune_epochs=epochs, unfreeze_stages=stages)
    head, *tune = plan_phases(strategy, fine_tune_at, config, num_blocks=14)
    assert head.name == "head warm-up"
    assert [p.name for p in tune] == [f"fine-tuning {s}/{stages}" for s in range(1, stages + 1)]
    assert [(p.strategy, p.fine_tune_at, p.epochs) for p in tune] == expected
    assert sum(p.epochs for p in tune) == epochs
    # Each stage is its own phase (own compile, own resumable record); a cached prefix when partial.
    assert [p.fast for p in tune] == [p.strategy == PARTIAL for p in tune]
    firsts = [0 if p.strategy == FULL else p.fine_tune_at % 14 for p in tune]
    assert firsts == sorted(firsts, reverse=True)  # top-down


def test_plan_refuses_gradual_unfreezing_it_cannot_do():
    config = TrainConfig(epochs=1, fine_tune_epochs=6, unfreeze_stages=3)
    with pytest.raises(ValueError, match="expected num_blocks .* received None"):
        plan_phases(FULL, None, config)
    with pytest.raises(ValueError, match="unfreeze_stages: expected at most the 2 blocks"):
        plan_phases(PARTIAL, -2, config, num_blocks=14)
    assert len(plan_phases(PARTIAL, -3, config, num_blocks=14)) == 4
    assert len(plan_phases(FEATURE_EXTRACTION, None, config)) == 1  # nothing to unfreeze


@pytest.mark.parametrize("converge_head", [True, False])
@pytest.mark.parametrize("refit", [True, False])
@pytest.mark.parametrize("strategy", [FEATURE_EXTRACTION, PARTIAL, FULL])
def test_plan_converges_the_head_and_refits_only_a_last_head_phase(strategy, converge_head, refit):
    config = TrainConfig(epochs=2, fine_tune_epochs=3, converge_head=converge_head, refit=refit)
    head, *rest = plan_phases(strategy, -1 if strategy == PARTIAL else None, config)
    assert head.converge is converge_head
    # Refitting on validation data would bias the early stopping of a later phase.
    assert head.refit is (refit and strategy == FEATURE_EXTRACTION)
    assert all(not p.converge and not p.refit for p in rest)


@pytest.mark.parametrize("solver", ["lbfgs", "gradient"])
@pytest.mark.parametrize("strategy", [FEATURE_EXTRACTION, PARTIAL, FULL, SCRATCH])
def test_plan_solves_only_the_head_warm_up(strategy, solver):
    config = TrainConfig(epochs=2, fine_tune_epochs=3, head_solver=solver)
    phases = plan_phases(strategy, -1 if strategy == PARTIAL else None, config)
    expected = [solver if p.name == config_lib.HEAD_WARM_UP else "gradient" for p in phases]
    assert [p.solver for p in phases] == expected
    assert TrainConfig().head_solver == "lbfgs"
    with pytest.raises(ValueError, match="Phase.solver: expected one of"):
        Phase("head", FEATURE_EXTRACTION, None, 1e-3, 1, solver="newton")


@pytest.mark.parametrize("views", [0, 1, 4])
def test_plan_and_run_phase_cache_the_configured_augmented_views(digits, views):
    model = tlkeras.build_model("MobileNet", 3, augment=tlkeras.AugmentConfig(), **SMALL)
    (head,) = plan_phases(FEATURE_EXTRACTION, None, TrainConfig(epochs=1, augment_views=views))
    assert head.augment_views == views
    result = run_phase(model, dataclasses.replace(head, converge=False), *_datasets(digits))
    assert result.history.fast_path["augment_views"] == views
    assert result.history.fast_path["mode"] == ("cached_views" if views else "cached_clean")


def test_plan_skips_an_empty_phase_and_refuses_a_plan_with_none():
    (only,) = plan_phases(FULL, None, TrainConfig(epochs=0, fine_tune_epochs=4))
    assert (only.name, only.epochs) == ("fine-tuning", 4)
    (head,) = plan_phases(PARTIAL, 3, TrainConfig(epochs=2, fine_tune_epochs=0, fast=False))
    assert (head.strategy, head.fast) == (FEATURE_EXTRACTION, False)
    with pytest.raises(ValueError, match="expected epochs >= 1 .* received epochs=0"):
        plan_phases(FEATURE_EXTRACTION, None, TrainConfig(epochs=0, fine_tune_epochs=4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "frozen"}, "strategy"),
        ({"fine_tune_at": 2}, "fine_tune_at: expected None unless strategy='partial'"),
        ({"epochs": 0}, "epochs: expected an int >= 1, received 0"),
        ({"learning_rate": 0.0}, "learning_rate: expected a finite number > 0, received 0.0"),
        ({"weight_decay": -1.0}, "weight_decay: expected a finite number >= 0, received -1.0"),
        ({"converge": "yes"}, "converge: expected a bool, received 'yes'"),
        ({"augment_views": 1.5}, "augment_views: expected an int"),
        ({"optimizer_name": "adam"}, "optimizer_name: expected one of adamw, sgd"),
        ({"layer_decay": 0.0}, r"layer_decay: expected a number in \(0, 1\], received 0.0"),
        ({"schedule": "linear"}, "schedule: expected one of constant, cosine"),
        ({"schedule": "cosine", "warmup_epochs": 1}, "warmup_epochs: expected an int >= 0 and <"),
        ({"warmup_epochs": 0.5}, "warmup_epochs: expected an int"),
        ({"ema_momentum": 1.0}, r"ema_momentum: expected a number in \(0, 1\)"),
        ({"ema": True, "solver": "lbfgs"}, "ema: expected False with solver='lbfgs'"),
    ],
)
def test_phase_rejects_bad_values(kwargs, match):
    args = {"name": "p", "strategy": FULL, "fine_tune_at": None, "learning_rate": 1e-3, "epochs": 1}
    with pytest.raises((ValueError, TypeError), match=match):
        Phase(**{**args, **kwargs})


def test_phase_optimizer_decays_kernels_but_not_biases():
    phase = Phase("p", FULL, None, learning_rate=0.1, epochs=1, weight_decay=0.5)
    kernel = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    bias = keras.Variable(np.ones((2,), "float32"), name="bias")
    optimizer = phase.optimizer()
    # A zero gradient: Adam's own step is 0, so any change is the decoupled weight decay.
    optimizer.apply_gradients(
        [(np.zeros((2, 2), "float32"), kernel), (np.zeros(2, "float32"), bias)]
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel), 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bias), 1.0)

    # ---------------------------------------------------------------------------------------------
    # The runner


def _weights_of(model, layer):
    return [np.array(w) for w in model.get_layer("backbone").get_layer(layer).get_weights()]


def test_run_phase_trains_the_head_on_cached_features(digits):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    stem = _weights_of(model, "conv1")
    head = [np.array(w) for w in model.get_layer("predictions").get_weights()]
    phase = Phase("head", FEATURE_EXTRACTION, None, 1e-2, epochs=2, fast=True)
    result = run_phase(model, phase, *_datasets(digits))
    assert result.fast_path is not None and result.fast_path == result.note
    assert result.epochs_run == 2 and result.seconds > 0
    head_params = sum(int(np.prod(w.shape)) for w in model.get_layer("predictions").weights)
    assert result.trainable_params == head_params
    after = model.get_layer("predictions").get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(after, head, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(stem, _weights_of(model, "conv1"), strict=True))


def test_run_phase_caches_a_partial_prefix_and_trains_what_follows(digits):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    blocks = tlkeras.blocks(model)
    before = [[np.array(w) for w in b.trainable_weights + b.non_trainable_weights] for b in blocks]
    phase = Phase("part", PARTIAL, -1, 1e-2, epochs=1, fast=True)
    result = run_phase(model, phase, *_datasets(digits))
    assert result.fast_path is not None  # the frozen prefix ran once, to the last block
    blocks = tlkeras.blocks(model)
    after = [[np.array(w) for w in b.trainable_weights + b.non_trainable_weights] for b in blocks]
    assert [b.trainable for b in blocks] == [False] * (len(blocks) - 1) + [True]
    for old, new in zip(before[:-1], after[:-1], strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(old, new, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(before[-1], after[-1], strict=True))


@pytest.mark.parametrize("strategy", [FULL, SCRATCH])
@pytest.mark.slow
def test_run_phase_trains_end_to_end_when_everything_trains(digits, strategy):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    phase = Phase(strategy, strategy, None, 1e-3, epochs=1, fast=True)
    result = run_phase(model, phase, *_datasets(digits))
    assert result.fast_path is None and result.note == "off"
    assert result.trainable_params == sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert result.trainable_params > 0.9 * model.count_params() - 1
    momentum = {
        layer.momentum
        for layer in model.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert (momentum == {SCRATCH_BN_MOMENTUM}) == (strategy == SCRATCH)


def test_run_phase_turns_a_nan_loss_into_loss_not_finite(digits):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    phase = Phase("head", FEATURE_EXTRACTION, None, 1e30, epochs=2, weight_decay=1e-4)
    with pytest.raises(
        LossNotFinite, match=r"loss became NaN at epoch 1 \(head\) with learning_rate=1e\+30"
    ):
        run_phase(model, phase, *_datasets(digits), callbacks=[keras.callbacks.TerminateOnNaN()])
    assert issubclass(LossNotFinite, ValueError)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.slow
def test_run_phase_converges_the_head_on_cached_features(digits, fast, monkeypatch):
    monkeypatch.setattr(runner, "CONVERGE_MAX_EPOCHS", 40)
    monkeypatch.setattr(runner, "CONVERGE_PATIENCE", 3)
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    phase = Phase("head", FEATURE_EXTRACTION, None, 3e-2, epochs=2, fast=fast, converge=True)
    theirs = keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True)
    result = run_phase(model, phase, *_datasets(digits), callbacks=[theirs])
    losses = result.history.history["val_loss"]
    if not fast:  # images through the whole model: the budget is the phase's own
        assert result.epochs_run <= 2
        return
    assert theirs.patience == 1  # the caller's callback is not changed; a copy converges
    assert 2 < result.epochs_run <= 40
    best = int(np.argmin(losses))
    # Stopped because 3 epochs passed without improvement, or at the ceiling.
    assert result.epochs_run == 40 or result.epochs_run == best + 1 + 3
    assert result.refit is None  # not asked for


def test_run_phase_refits_on_train_and_validation(digits):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    phase = Phase("head", FEATURE_EXTRACTION, None, 3e-2, epochs=3, fast=True, refit=True)
    train, validation = _datasets(digits)
    result = run_phase(model, phase, train, validation)
    n = sum(int(y.shape[0]) for _, y in train) + sum(int(y.shape[0]) for _, y in validation)
    assert result.refit == {"epochs": fast_path.best_epochs(result.history), "examples": n}


@pytest.mark.parametrize("refit", [False, True])
def test_run_phase_solves_a_linear_head_as_one_logged_epoch(digits, tmp_path, refit):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    phase = Phase(
        "head", FEATURE_EXTRACTION, None, 1e-3, epochs=7, fast=True, refit=refit, solver="lbfgs"
    )
    train, validation = _datasets(digits)
    csv = tmp_path / "log.csv"
    saver = fast_path.SaveFullModel(
        model, tmp_path / "best.keras", monitor="val_loss", save_best_only=True
    )
    result = run_phase(
        model, phase, train, validation, callbacks=[keras.callbacks.CSVLogger(str(csv)), saver]
    )
    assert result.epochs_run == 1  # solved, not trained for the budget of 7
    assert result.solver["method"] == "lbfgs" and result.solver["selected_by"] == "validation"
    assert len(csv.read_text().strip().splitlines()) == 2  # header + the one epoch
    assert (tmp_path / "best.keras").is_file()  # callbacks saw the epoch
    logged = result.history.history["val_loss"][0]
    model.compile(loss="categorical_crossentropy")
    if refit:
        n = sum(int(y.shape[0]) for _, y in train) + sum(int(y.shape[0]) for _, y in validation)
        assert result.refit == {"examples": n, "solver": "lbfgs", "C": result.solver["C"]}
    else:
        # The solved weights are the full model's: it scores the logged validation loss.
        assert result.refit is None
        assert model.evaluate(validation, verbose=0) == pytest.approx(logged, rel=1e-4)


def test_run_phase_says_why_a_head_is_not_solved(digits):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    phase = Phase("head", FEATURE_EXTRACTION, None, 1e-3, epochs=2, fast=True, solver="lbfgs")
    result = run_phase(model, phase, *_datasets(digits), label_smoothing=0.1)
    assert result.solver == {
        "method": "gradient",
        "why": "label_smoothing=0.1 has no closed-form counterpart",
    }
    assert result.epochs_run == 2


# ---------------------------------------------------------------------------------------------
# The fine-tuning recipe in the runner


class _KeepOptimizer(keras.callbacks.Callback):
    """The optimizer of what trained (the suffix on the fast path), read when training ends."""

    def on_train_end(self, logs=None):
        self.optimizer = self.model.optimizer
        self.trained = [np.array(v.numpy()) for v in self.model.optimizer._trainable_variables]


def _same_start(model):
    twin = tlkeras.build_model("MobileNet", 3, **SMALL)
    twin.set_weights(model.get_weights())
    return twin


@pytest.mark.parametrize("strategy, fine_tune_at, fast", [(FULL, None, False), (PARTIAL, -1, True)])
@pytest.mark.slow
def test_run_phase_with_ema_ends_and_checkpoints_with_the_averaged_weights(
    digits, tmp_path, strategy, fine_tune_at, fast
):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    plain = _same_start(model)
    phase = Phase(
        "ft", strategy, fine_tune_at, 1e-2, epochs=2, fast=fast, ema=True, ema_momentum=0.9
    )
    keep = _KeepOptimizer()
    saver = fast_path.SaveFullModel(model, tmp_path / "last.keras", monitor="val_loss")
    result = run_phase(model, phase, *_datasets(digits), callbacks=[saver, keep])
    assert (result.fast_path is not None) == fast
    optimizer = keep.optimizer
    assert optimizer.use_ema
    averages = [np.array(v.numpy()) for v in optimizer._model_variables_moving_average]
    for weights, average in zip(keep.trained, averages, strict=True):
        np.testing.assert_allclose(weights, average, rtol=1e-6, atol=1e-7)
    # The checkpoint of the last epoch holds the averaged weights too: it is the final model.
    saved = keras.saving.load_model(tmp_path / "last.keras")
    for a, b in zip(saved.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Without EMA the same phase ends elsewhere.
    run_phase(plain, dataclasses.replace(phase, ema=False), *_datasets(digits))
    trained = [v.path for v in optimizer._trainable_variables]
    by_path = {v.path: np.array(v.numpy()) for v in plain.weights}
    assert any(not np.allclose(by_path[p], w) for p, w in zip(trained, keep.trained, strict=True))


@pytest.mark.slow
def test_run_phase_follows_a_cosine_schedule_with_per_block_rates(digits):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    phase = Phase(
        "ft",
        FULL,
        None,
        1e-2,
        epochs=3,
        optimizer_name="sgd",
        layer_decay=0.8,
        schedule="cosine",
        warmup_epochs=1,
    )
    before = [np.array(w) for w in model.get_weights()]
    keep = _KeepOptimizer()
    result = run_phase(model, phase, *_datasets(digits), callbacks=[runner.LogLearningRate(), keep])
    rates = result.history.history["learning_rate"]
    # Logged at each epoch's end: the end of the warm-up (the peak), half-way down, zero.
    assert rates[0] == pytest.approx(1e-2, rel=1e-5)
    assert rates[1] == pytest.approx(5e-3, rel=1e-3)
    assert rates[2] == pytest.approx(0.0, abs=1e-9)
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    table = tlkeras.fitting.optimizers.block_lr_multipliers(model, 0.8)
    assert keep.optimizer._lr_multipliers == table and isinstance(
        keep.optimizer, keras.optimizers.SGD
    )
    with pytest.raises(ValueError, match="expected steps_per_epoch >= 1 for schedule='cosine'"):
        phase.optimizer(model)
    with pytest.raises(ValueError, match="expected the model .* received None"):
        phase.optimizer(steps_per_epoch=3)


@pytest.mark.parametrize("strategy, fast", [(FULL, False), (FEATURE_EXTRACTION, True)])
@pytest.mark.slow
def test_run_phase_mixes_the_training_data_only_end_to_end(digits, strategy, fast):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    calls = []

    def mix(dataset):
        calls.append(dataset)
        return dataset.map(lambda x, y: (x[::-1], y[::-1]))

    phase = Phase("p", strategy, None, 1e-3, epochs=1, fast=fast)
    result = run_phase(model, phase, *_datasets(digits), mix=mix)
    assert len(calls) == (0 if fast else 1)
    if fast:
        assert result.fast_path is not None and result.note.startswith(result.fast_path)
        assert "trained without mixing" in result.note
    else:
        assert "mixing" not in result.note


@pytest.mark.parametrize("policy, scaled", [("mixed_float16", True), ("mixed_bfloat16", False)])
def test_a_float16_model_gets_a_loss_scaled_optimizer_and_its_copy_too(policy, scaled):
    # Keras's compile scales only a model whose own policy is mixed_float16: the fast path's
    # suffix and the LR finder's clone are not built under it, so the phase's optimizer does.
    model = tlkeras.build_model("MobileNet", 3, strategy="full", dtype_policy=policy, **SMALL)
    phase = Phase("ft", "full", None, 1e-3, epochs=1)
    for target in (model, keras.models.clone_model(model)):
        optimizer = phase.optimizer(target)
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) is scaled
    assert not isinstance(
        phase.optimizer(tlkeras.build_model("MobileNet", 3, **SMALL)),
        keras.optimizers.LossScaleOptimizer,
    )


def _seeded_full_phase(seed):
    config_lib.set_seed(seed)
    digits = data_lib.load("digits:0-2", image_size=(32, 32), batch_size=32, seed=seed)
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    run_phase(model, Phase(FULL, FULL, None, 1e-3, epochs=1, fast=False), *_datasets(digits))
    return [np.array(w) for w in model.weights]


def test_a_seeded_phase_repeats_itself_to_the_last_bit():
    # set_seed makes TensorFlow's ops deterministic: without it, CPU thread scheduling under load
    # changed the main job's fine-tuning from run to run.
    first, again = _seeded_full_phase(0), _seeded_full_phase(0)
    # TensorFlow's own flag (no public getter): set_seed turned op determinism on.
    assert tf_framework_config.is_op_determinism_enabled()
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = _seeded_full_phase(1)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
