"""tlkeras.analysis.tta: the views, the --tta parser, and averaging in memory, on an export and in its graph."""

from __future__ import annotations

import json
import os

import badfiles
import keras
import numpy as np
import pytest
from conftest import REPO, run_python

from tlkeras.analysis import tta
from tlkeras.exports import loading as exported
from tlkeras.exports import savedmodel

NAMES = ["ants", "bees", "wasps"]


def mirror_blind_model(seed: int = 0) -> keras.Model:
    """Global average pool straight after the input, then a softmax: a mirror image (and any
    rearrangement of the pixels) gives the same answer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def mirror_aware_model(seed: int = 0) -> keras.Model:
    """The left half of the image weighs differently from the right: a mirror image changes it."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def pixels(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


# --------------------------------------------------------------------------------------------------
# Config and parser.


@pytest.mark.parametrize(
    "text, flip, crops, fraction, views",
    [
        ("flip", True, 0, 0.875, 2),
        ("crops", False, 5, 0.875, 6),
        ("Flip, Crops", True, 5, 0.875, 7),
        ("flip,crops=5,crop_fraction=0.8", True, 5, 0.8, 7),
    ],
)
def test_parse(text, flip, crops, fraction, views):
    config = tta.parse(text)
    assert (config.flip, config.crops, config.crop_fraction) == (flip, crops, fraction)
    assert config.num_views == views == len(config.to_dict()["views"])
    assert tta.parse(str(config)) == config  # the string round-trips (metadata.json's "spec")


@pytest.mark.parametrize("text", ["none", "", " NONE ", None])
def test_parse_none(text):
    assert tta.parse(text) is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("flop", "unknown 'flop'"),
        ("flip,flip", "repeated 'flip'"),
        ("none,flip", "unknown 'none'"),
        ("flip=1", "unknown 'flip=1'"),
        ("crops=x", "bad value in 'crops=x'"),
        ("crops=3", "crops: expected one of (0, 5), received 3"),
        ("crops=0", "at least one view"),
        ("crops,crop_fraction=1.5", "crop_fraction: expected a number in [0.5, 1)"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match="expected") as info:
        tta.parse(text)
    assert match in str(info.value)


def test_views():
    x = pixels(2)
    config = tta.TTAConfig(flip=True, crops=5)
    views = [v.numpy() for v in config.views(x)]
    assert len(views) == 7 and all(v.shape == x.shape for v in views)
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[1], x[:, :, ::-1, :])
    # Crops of a flat image are the same flat image, resized back.
    flat = np.full((1, 32, 32, 3), 90.0, "float32")
    for v in config.views(flat):
        np.testing.assert_allclose(v.numpy(), flat, atol=1e-4)
    assert not np.allclose(views[2], x)  # a corner crop, enlarged


# --------------------------------------------------------------------------------------------------
# Averaging: in memory, on an export (client side) and in the export's graph.


def test_tta_changes_nothing_for_a_mirror_blind_model_in_memory():
    model, x = mirror_blind_model(), pixels()
    plain = model.predict(x, verbose=0)
    np.testing.assert_allclose(tta.average_probabilities(model, x, "flip"), plain, atol=1e-6)
    np.testing.assert_allclose(tta.average_probabilities(model, x, None), plain, atol=1e-6)
    # A model that sees the mirror image differently gets the mean of both views.
    aware = mirror_aware_model()
    both = (aware.predict(x, verbose=0) + aware.predict(x[:, :, ::-1], verbose=0)) / 2
    averaged = tta.average_probabilities(lambda v: aware(v).numpy(), x, tta.TTAConfig())
    np.testing.assert_allclose(averaged, both, atol=1e-6)
    assert not np.allclose(averaged, aware.predict(x, verbose=0), atol=1e-4)
    with pytest.raises(ValueError, match="expected a Keras model or a callable"):
        tta.average_probabilities(42, x, "flip")


def test_tta_in_the_export_graph_and_client_side(tmp_path):
    blind = mirror_blind_model()
    baked = savedmodel.export(
        blind, "blind", base_dir=tmp_path, class_names=NAMES, verify=False, tta="flip"
    )
    loaded = exported.load_exported(baked.path)
    assert loaded.metadata["tta"]["spec"] == "flip" and loaded.metadata["tta"]["views"] == [
        "image",
        "flip",
    ]
    x = pixels()
    np.testing.assert_allclose(
        loaded.predict_pixels(x)["probabilities"], blind.predict(x, verbose=0), atol=1e-5
    )
    with pytest.raises(ValueError, match="already averages over test-time views"):
        tta.TTAModel(loaded, "flip")  # the views would be averaged twice

    # A mirror-aware model: the baked graph and the client side give the same mean of both views.
    aware = mirror_aware_model()
    want = tta.average_probabilities(aware, x, "flip")
    plain = savedmodel.export(aware, "aware", base_dir=tmp_path, class_names=NAMES, verify=False)
    client = tta.TTAModel(exported.load_exported(plain.path), "flip")
    out = client.predict_pixels(x)
    np.testing.assert_allclose(out["probabilities"], want, atol=1e-5)
    assert out["classes"][:, 0].tolist() == [NAMES[i].encode() for i in want.argmax(1)]
    assert client.class_names == NAMES and client.path == plain.path
    in_graph = savedmodel.export(
        aware, "aware", base_dir=tmp_path, class_names=NAMES, verify=False, tta="flip"
    )
    np.testing.assert_allclose(
        exported.load_exported(in_graph.path).predict_pixels(x)["probabilities"], want, atol=1e-5
    )


def test_evaluate_script_reports_the_tta_gain(tmp_path):
    model = mirror_aware_model()
    result = savedmodel.export(model, "aware", base_dir=tmp_path, class_names=NAMES, verify=False)
    folder = badfiles.make_dataset(tmp_path / "data", classes=("ants", "bees"), per_class=4)
    out = tmp_path / "eval"
    proc = run_python(
        REPO / "scripts" / "evaluate.py",
        f"--model={result.path}",
        f"--data={folder}",
        "--tta=flip",
        f"--output_dir={out}",
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test-time augmentation (flip, 2 views): accuracy" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    t = metrics["tta"]
    assert t["spec"] == "flip" and t["views"] == ["image", "flip"]
    assert t["accuracy_with"] == metrics["accuracy"] and metrics["num_examples"] == 8
    assert t["gain"] == pytest.approx(t["accuracy_with"] - t["accuracy_without"])
    assert 0 <= metrics["expected_calibration_error"] <= 1
