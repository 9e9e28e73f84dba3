"""The offline transfer story: cached pre-trained weights, weights strings, strategy comparison."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from tlkeras import transfer
from tlkeras.model import build_model
from tlkeras.training import TrainConfig

KWARGS = {"alpha": 0.25}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One KERAS_HOME for the module: the (1-epoch) pre-training runs once."""
    path = tmp_path_factory.mktemp("keras_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(path))
        mp.setattr(transfer, "DEFAULT_PRETRAIN_EPOCHS", 1)
        yield path


def test_pretrained_weights_are_cached_and_transfer(home):
    path = transfer.pretrained_weights("digits:0-4", "MobileNet", KWARGS, image_size=32)
    assert path.is_file() and path.name.endswith(".weights.h5")
    assert path.parent == home / "tlkeras" / "pretrained"
    record = transfer.pretrained_record(path)
    assert record["source"] == "digits:0-4" and record["class_names"] == list("01234")
    assert 0.0 <= record["source_val_accuracy"] <= 1.0
    mtime = path.stat().st_mtime_ns
    assert transfer.pretrained_weights("digits:0-4", "MobileNet", KWARGS, image_size=32) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not retrained
    # Another recipe is another file (found in the cache or not: never the same name).
    assert transfer._cache_key(a=1) != transfer._cache_key(a=2)
    # The weights land in a new model's backbone, at any input size.
    for size in (32, 48):
        model = build_model(
            "MobileNet", 5, weights=str(path), input_shape=(size, size, 3), backbone_kwargs=KWARGS
        )
        fresh = build_model(
            "MobileNet", 5, weights=None, input_shape=(size, size, 3), backbone_kwargs=KWARGS
        )
        conv = model.get_layer("backbone").get_layer("conv1").get_weights()[0]
        saved = (
            keras.applications.MobileNet(
                alpha=0.25, include_top=False, weights=str(path), input_shape=(32, 32, 3)
            )
            .get_layer("conv1")
            .get_weights()[0]
        )
        np.testing.assert_array_equal(conv, saved)
        assert not np.allclose(
            conv, fresh.get_layer("backbone").get_layer("conv1").get_weights()[0]
        )


def test_resolve_weights_forms(home, tmp_path):  # after the test above: the cache is warm
    assert transfer.resolve_weights(None) is None
    assert transfer.resolve_weights("none") is None
    assert transfer.resolve_weights("ImageNet") == "imagenet"
    file = tmp_path / "w.weights.h5"
    file.write_bytes(b"")
    assert transfer.resolve_weights(str(file)) == str(file)
    resolved = transfer.resolve_weights("source:digits:0-4", "MobileNet", KWARGS, (32, 32, 3))
    assert resolved == str(transfer.pretrained_weights("digits:0-4", "MobileNet", KWARGS))
    assert resolved.startswith(str(home)) and resolved.endswith(".weights.h5")


@pytest.mark.parametrize(
    "weights,error,match",
    [
        ("missing.h5", FileNotFoundError, "no such file"),
        ("source:mnist", ValueError, "expected an embedded source task"),
        ("source:digits:0-4x", ValueError, "expected an embedded source task"),
        (3, TypeError, "expected 'imagenet'"),
    ],
)
def test_resolve_weights_errors(home, weights, error, match):
    with pytest.raises(error, match=match):
        transfer.resolve_weights(weights, "MobileNet", KWARGS, (32, 32, 3))


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 0}, {"epochs": -1}, {"backbone_kwargs": "alpha"}]
)
def test_pretrained_weights_bad_arguments(home, kwargs):
    with pytest.raises((ValueError, TypeError), match="expected"):
        transfer.pretrained_weights(
            "digits:0-4", "MobileNet", **{"backbone_kwargs": KWARGS, **kwargs}
        )


def test_transfer_story_table(home, tmp_path):
    config = TrainConfig(epochs=1, fine_tune_epochs=1, early_stopping_patience=0)
    # Two strategies keep the test short; scripts/compare.py's test runs the other two.
    strategies = ("scratch", "feature_extraction")
    table = transfer.transfer_story(
        strategies=strategies, config=config, output_dir=tmp_path / "story"
    )
    assert [r.strategy for r in table.rows] == list(strategies)
    params = {r.strategy: r.trainable_params for r in table.rows}
    assert params["feature_extraction"] < params["scratch"] / 10  # the head alone
    assert table.row("scratch").weights is None
    assert table.row("feature_extraction").weights == table.extra["weights"]
    assert all(0.0 <= r.accuracy <= 1.0 and r.wall_seconds > 0 for r in table.rows)
    assert table.extra["source"] == "digits:0-4" and table.extra["target"] == "digits:5-9"
    text = str(table)
    assert "feature_extraction" in text and "test accuracy" in text
    paths = table.save(tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert [r["strategy"] for r in saved["rows"]] == list(strategies)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_strategies_rejects_unknown_strategy(home):
    from tlkeras.data import load

    data = load("digits:5-9", image_size=(32, 32))
    with pytest.raises(ValueError, match="expected a non-empty subset"):
        transfer.compare_strategies(data, weights=None, strategies=["bogus"])
