"""Tests for tlkeras.fitting.lr_finder: the learning-rate range test on a copy of the model."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
from conftest import MOBILENET_WEIGHTS, needs_shared_weights

from tlkeras.data import sources as data_lib
from tlkeras.fitting import lr_finder
from tlkeras.fitting.config import TrainConfig
from tlkeras.models.builder import build_model


@pytest.fixture(scope="module")
def data():
    # Dark images are class 0, bright ones class 1: pretrained features tell them apart at once.
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    level = np.where(y == 0, 40, 215)[:, None, None, None]
    x = np.clip(level + rng.normal(0, 25, (80, 32, 32, 3)), 0, 255).astype("uint8")
    return data_lib.load((x, y), image_size=32, batch_size=8, test_split=0.0)


def _mobilenet(weights: str | None) -> keras.Model:
    return build_model(
        "MobileNet", 2, weights=weights, input_shape=(32, 32, 3), backbone_kwargs={"alpha": 0.25}
    )


@pytest.fixture(scope="module")
def model():
    # Random weights: the curve is mostly noise (a random backbone's pooled features vanish), but
    # every mechanism runs; the shared-weights test below checks a real dip.
    return _mobilenet(None)


def _state(model: keras.Model) -> tuple[list[np.ndarray], list[bool]]:
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    return [w.copy() for w in model.get_weights()], [layer.trainable for layer in layers]


def _assert_untouched(model: keras.Model, before: tuple[list[np.ndarray], list[bool]]) -> None:
    weights, flags = _state(model)
    assert flags == before[1]
    assert all(np.array_equal(a, b) for a, b in zip(weights, before[0], strict=True))
    assert getattr(model, "optimizer", None) is None  # the caller's model was never compiled


def test_head_sweep_runs_on_cached_features_and_follows_its_rule(model, data, tmp_path):
    before = _state(model)
    result = lr_finder.find_lr(model, data, min_lr=1e-4, max_lr=10.0, steps=40)
    _assert_untouched(model, before)

    assert result.on_cached_features and result.strategy == "feature_extraction"
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) >= 10
    assert np.all(np.diff(result.lrs) > 0) and result.lrs[0] == pytest.approx(1e-4)
    assert all(math.isfinite(v) for v in result.losses + result.raw_losses)
    # The rule: the learning rate at the smoothed minimum (past the first tenth) / 10, clipped.
    skip = 40 // 10
    assert result.min_loss_lr == result.lrs[skip + int(np.argmin(result.losses[skip:]))]
    assert result.suggestion == pytest.approx(np.clip(result.min_loss_lr / 10, 1e-4, 10.0))
    assert 1e-4 <= result.suggestion <= 10.0 and math.isfinite(result.suggestion)
    assert result.rule == lr_finder.RULE and "/ 10" in result.rule
    assert result.lrs[skip] <= result.steepest <= result.min_loss_lr

    record = json.loads(json.dumps(result.to_dict()))
    assert record["suggestion"] == result.suggestion and record["steps_run"] == len(result.lrs)
    path = result.plot(tmp_path / "plots" / "lr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_huge_max_lr_stops_the_sweep_early(model, data):
    result = lr_finder.find_lr(model, data, min_lr=1e-3, max_lr=1e6, steps=40)
    assert result.stopped_early and len(result.lrs) < 40
    assert "minimum" in result.stop_reason or "not finite" in result.stop_reason
    assert 1e-3 <= result.suggestion < result.lrs[-1]


@needs_shared_weights
def test_pretrained_features_give_a_dip_then_a_divergence(data):
    result = lr_finder.find_lr(
        _mobilenet(str(MOBILENET_WEIGHTS)), data, min_lr=1e-3, max_lr=1e6, steps=40
    )
    assert result.on_cached_features and result.stopped_early
    assert min(result.losses) < 0.9 * result.losses[0]  # the head learnt before it diverged
    assert result.suggestion == pytest.approx(result.min_loss_lr / 10)
    assert result.steepest <= result.min_loss_lr < result.lrs[-1]


def test_partial_sweeps_end_to_end_and_leaves_the_model_alone(model, data):
    before = _state(model)
    result = lr_finder.find_lr(
        model, data, strategy="partial", fine_tune_at=-1, min_lr=1e-4, max_lr=10.0, steps=12
    )
    _assert_untouched(model, before)
    assert not result.on_cached_features
    assert result.strategy == "partial" and result.fine_tune_at == -1
    assert 1e-4 <= result.suggestion <= 10.0


def test_a_loss_that_never_decreases_is_an_error(model, data):
    # The first step at 1e30 overflows the loss: nothing below the initial loss was recorded.
    with pytest.raises(ValueError, match="never decreased between min_lr=1e"):
        lr_finder.find_lr(model, data, min_lr=1e30, max_lr=1e36, steps=10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_lr": 0.0}, "min_lr: expected a number > 0, received 0.0"),
        ({"min_lr": 1e-2, "max_lr": 1e-3}, "max_lr: expected a number > min_lr=0.01"),
        ({"steps": 5}, "steps: expected an int >= 10, received 5"),
        ({"steps": 20.0}, "steps: expected an int"),
        ({"diverge_factor": 1.0}, "diverge_factor: expected a number > 1"),
        ({"smoothing": 1.0}, "smoothing: expected a number in [0, 1)"),
        ({"max_lr": float("inf")}, "max_lr: expected a finite number"),
        ({"strategy": "everything"}, "strategy: expected one of"),
        ({"strategy": "full", "fine_tune_at": 3}, "fine_tune_at"),
        ({"config": {"label_smoothing": 0.1}}, "config: expected a TrainConfig"),
    ],
)
def test_bad_arguments_raise_value_error(model, data, kwargs, message):
    with pytest.raises(ValueError) as e:
        lr_finder.find_lr(model, data, **kwargs)
    assert message in str(e.value)


def test_suggest_learning_rate_for_train_auto(model, data, tmp_path, capsys):
    config = TrainConfig(label_smoothing=0.1, class_weight="auto", seed=1)
    plot = tmp_path / "lr_find.png"
    lr = lr_finder.suggest_learning_rate(model, data, config, steps=30, plot=plot, verbose=1)
    assert isinstance(lr, float) and lr_finder.DEFAULT_MIN_LR <= lr <= lr_finder.DEFAULT_MAX_LR
    assert plot.is_file()
    assert "learning_rate=auto:" in capsys.readouterr().out
