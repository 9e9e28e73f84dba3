"""Weights: the one resolver of ``weights`` values (tlkeras.models.weights, tlkeras.fitting.pretrain),
the cached source-task pre-training and the input size ``"auto"`` picks (tlkeras.data.sizing)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tlkeras import data as data_lib
from tlkeras.data import load
from tlkeras.fitting import pretrain
from tlkeras.models import weights as weights_lib
from tlkeras.models.builder import build_model

KWARGS = {"alpha": 0.25}


@pytest.mark.slow
def test_pretrained_weights_are_cached_and_transfer(home):
    path = pretrain.pretrained_weights("digits:0-4", "MobileNet", KWARGS, image_size=32)
    assert path.is_file() and path.name.endswith(".weights.h5")
    assert path.parent == home / "tlkeras" / "pretrained"
    record = pretrain.pretrained_record(path)
    assert record["source"] == "digits:0-4" and record["class_names"] == list("01234")
    assert (record["epochs"], record["image_size"], record["seed"]) == (1, 32, 0)
    # An accuracy over the source task's validation split: a whole number of its images.
    split = load("digits:0-4", image_size=(32, 32), seed=0, validation_split=0.1, test_split=0.0)
    n = sum(split.counts["validation"].values())
    correct = record["source_val_accuracy"] * n
    assert 0 <= correct <= n and abs(correct - round(correct)) < 1e-3, (correct, n)
    mtime = path.stat().st_mtime_ns
    assert pretrain.pretrained_weights("digits:0-4", "MobileNet", KWARGS, image_size=32) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not retrained
    # Another recipe is another file (found in the cache or not: never the same name).
    assert pretrain._cache_key(a=1) != pretrain._cache_key(a=2)
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


@pytest.mark.slow
def test_resolve_weights_forms(home, tmp_path):  # after the test above: the cache is warm
    assert pretrain.resolve(None) is None
    assert pretrain.resolve("none") is None
    assert pretrain.resolve("ImageNet") == "imagenet"
    file = tmp_path / "w.weights.h5"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save_weights(file)
    assert pretrain.resolve(str(file)) == str(file)
    empty = tmp_path / "empty.weights.h5"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        pretrain.resolve(str(empty))
    resolved = pretrain.resolve("source:digits:0-4", "MobileNet", KWARGS, (32, 32, 3))
    assert resolved == str(pretrain.pretrained_weights("digits:0-4", "MobileNet", KWARGS))
    assert resolved.startswith(str(home)) and resolved.endswith(".weights.h5")


def test_check_trains_nothing(tmp_path, monkeypatch):
    """``models.weights.check`` (parsing ``--weights``) leaves ``source:`` values to the
    pre-training: nothing is trained or cached."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert weights_lib.check(" source:digits:0-4 ", (32, 32, 3)) == "source:digits:0-4"
    assert weights_lib.check("ImageNet") == "imagenet" and weights_lib.check("none") is None
    assert not (tmp_path / "tlkeras").exists()
    with pytest.raises(ValueError, match=r"input_shape: expected \(height, width, 3\)"):
        weights_lib.check("source:digits:0-4", (32, 32, 1))


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
        pretrain.resolve(weights, "MobileNet", KWARGS, (32, 32, 3))


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 0}, {"epochs": -1}, {"backbone_kwargs": "alpha"}]
)
def test_pretrained_weights_bad_arguments(home, kwargs):
    with pytest.raises((ValueError, TypeError), match="expected"):
        pretrain.pretrained_weights(
            "digits:0-4", "MobileNet", **{"backbone_kwargs": KWARGS, **kwargs}
        )


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, None),
        ("", None),
        (" None ", None),
        ("random", None),
        ("ImageNet", "imagenet"),
        (" w.h5 ", "w.h5"),
        ("source:digits:0-4", "source:digits:0-4"),
    ],
)
def test_parse_is_syntax_only(text, expected):
    assert weights_lib.parse(text) == expected


@pytest.mark.parametrize(
    "image_size, weights, expected",
    [
        (None, "source:digits:0-4", (64, 64)),
        ("auto", "source:digits:0-4", (64, 64)),
        (None, "imagenet", (224, 224)),
        (None, None, (224, 224)),
        (96, "imagenet", (96, 96)),
        ("96", "imagenet", (96, 96)),  # the flag's text
        ((64, 80), None, (64, 80)),
    ],
)
def test_image_size_for(image_size, weights, expected):
    assert data_lib.image_size_for(image_size, weights, "MobileNet") == expected


@pytest.mark.parametrize("bad", [0, -3, (32,), (32, 0), "big", "auto2", 2.5])
def test_image_size_for_rejects(bad):
    with pytest.raises(ValueError, match="image_size: expected 'auto', a positive int"):
        data_lib.image_size_for(bad, None, "MobileNet")


@pytest.mark.parametrize(
    "resolution, backbone, weights, expected",
    [
        ((32, 32), "MobileNet", "imagenet", 32 * -(-32 * weights_lib.AUTO_UPSCALE // 32)),
        ((375, 500), "MobileNet", "imagenet", 224),  # photos: the backbone's default
        ((8, 8), "MobileNet", None, 32),  # never under the backbone's minimum
        ((8, 8), "Xception", None, 71),  # Xception's minimum
        ((32, 32), "InceptionV3", None, 96),
        ((150, 100), "EfficientNetB7", None, 320),  # 3x100 rounded up, under B7's 600
        (None, "ResNet50", "imagenet", 224),  # unknown resolution: the default
        ((32, 32), "MobileNet", "source:digits:0-4", 64),  # source: keeps its pre-training size
    ],
)
def test_auto_image_size(resolution, backbone, weights, expected):
    size, why = weights_lib.auto_image_size(resolution, backbone, weights)
    assert size == expected and why


def test_image_size_auto_reads_the_data(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / label / f"{i}.png")
    assert data_lib.source_resolution(tmp_path) == (30, 40)
    size, why = data_lib.choose_image_size("auto", "imagenet", "MobileNet", str(tmp_path))
    assert size == (96, 96) and "30x40" in why  # 3 x 30 = 90, rounded up to 96
    assert data_lib.choose_image_size(64, "imagenet", "MobileNet", str(tmp_path)) == (
        (64, 64),
        None,
    )
    x = np.zeros((4, 20, 24, 3), np.uint8)
    assert data_lib.source_resolution((x, np.zeros(4))) == (20, 24)
    assert data_lib.source_resolution("digits:5-9") == (8, 8)
    assert data_lib.source_resolution("tfds:mnist") is None  # not read here: the default


@pytest.mark.slow
def test_pretraining_prints_progress_once_and_not_when_cached(home, tmp_path, capsys):
    args = ("digits:0-4", "MobileNet", KWARGS, 32, 2)
    pretrain.pretrained_weights(*args, cache_dir=tmp_path, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Pre-training MobileNet") and "digits:0-4" in lines[0]
    epochs = [ln for ln in lines if ln.strip().startswith("source digits:0-4: epoch")]
    assert [ln.split("epoch ")[1].split()[0] for ln in epochs] == ["1/2", "2/2"]
    assert "validation accuracy" in epochs[-1]
    pretrain.pretrained_weights(*args, cache_dir=tmp_path, progress=True)
    assert "Pre-training" not in capsys.readouterr().out  # cached: nothing to wait for


@pytest.mark.parametrize(
    "backbone, kwargs, weights, expected",
    [
        ("MobileNet", None, "source:digits:0-4", weights_lib.DEFAULT_BACKBONE_KWARGS),
        ("MobileNet", {"alpha": 0.5}, "source:digits:0-4", {"alpha": 0.5}),
        ("MobileNet", {}, "source:digits:0-4", {}),
        ("ResNet50", None, "source:digits:0-4", {}),
        ("MobileNet", None, "imagenet", {}),  # Keras's own default width
        ("MobileNet", {"alpha": 0.5}, None, {"alpha": 0.5}),
    ],
)
def test_backbone_kwargs_for(backbone, kwargs, weights, expected):
    assert weights_lib.backbone_kwargs_for(backbone, kwargs, weights) == expected
