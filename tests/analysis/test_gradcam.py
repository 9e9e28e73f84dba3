"""tlkeras.analysis.gradcam: the target from the blocks on every family, where the heat lands on a model
built to look at one region, the heads, overlay, errors, and the export's ``explain`` signature."""

from __future__ import annotations

import json

import badfiles
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import small_input

import tlkeras
from tlkeras.analysis import gradcam
from tlkeras.data import decoding
from tlkeras.exports import layout, savedmodel, signatures
from tlkeras.exports import loading as exported
from tlkeras.models.backbones import BACKBONES

# One backbone per family: the first of the table's rows (the smallest), at its smallest input.
FAMILY_MODELS = {}
for _name, _spec in BACKBONES.items():
    FAMILY_MODELS.setdefault(_spec.family.name, _name)
TINY = {
    "MobileNet": {"alpha": 0.25},
    "MobileNetV2": {"alpha": 0.35},
    "MobileNetV3Small": {"alpha": 0.75, "minimalistic": True},
}


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_every_family_gives_input_sized_maps_in_0_1(family):
    name = FAMILY_MODELS[family]
    shape = small_input(name)
    model = tlkeras.build_model(
        name, 3, weights=None, input_shape=shape, backbone_kwargs=TINY.get(name)
    )
    target = gradcam.target_layer(model)
    # Found from the blocks: a block of this model, with a spatial map (h, w > 1).
    assert tlkeras.block_names(model)[target.block_index] == target.name
    assert target.shape[0] > 1 and target.shape[1] > 1
    images = np.random.default_rng(0).uniform(0, 255, (2, *shape)).astype("float32")
    maps = gradcam.gradcam(model, images, class_index=[0, 2])
    assert maps.shape == (2, *shape[:2]) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    keras.backend.clear_session()


def test_the_last_block_is_the_target_when_its_map_is_spatial():
    model = tlkeras.build_model(
        "MobileNet", 2, weights=None, input_shape=(64, 64, 3), backbone_kwargs={"alpha": 0.25}
    )
    target = gradcam.target_layer(model)  # 64 px: the last block's map is 2x2
    assert (target.name, target.block_index, target.shape) == ("conv_13", 13, (2, 2, 256))
    small = tlkeras.build_model(
        "MobileNet", 2, weights=None, input_shape=(32, 32, 3), backbone_kwargs={"alpha": 0.25}
    )
    assert gradcam.target_layer(small).name == "conv_11"  # 32 px: conv_12 and conv_13 are 1x1


# --------------------------------------------------------------------------------------------------
# A model built to look at one region: class "red" sees only red pixels, class "green" only green.

SIZE = 32
RED, GREEN = 0, 1


def colour_model(head: str = "softmax") -> keras.Model:
    """Red and green detectors (1x1 conv) -> 4x4 average pooling (an 8x8 map) -> GAP -> head.

    ``softmax``/``multilabel``: logit c = 4 x the mean of detector c. ``binary``: one sigmoid unit,
    z = 4 (mean red - mean green)."""
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    detect = keras.layers.Conv2D(2, 1, activation="relu", name="detect")
    x = keras.layers.AveragePooling2D(4, name="cells")(detect(x))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    units, activation = {"softmax": (2, "softmax"), "multilabel": (2, "sigmoid")}.get(
        head, (1, "sigmoid")
    )
    dense = keras.layers.Dense(units, activation=activation, name="predictions")
    model = keras.Model(inputs, dense(x))
    detect.set_weights([np.array([[[[1, -1], [-1, 1], [-1, -1]]]], "float32"), np.zeros(2)])
    kernel = 4 * np.eye(2, dtype="float32") if units == 2 else np.array([[4.0], [-4.0]], "float32")
    dense.set_weights([kernel, np.zeros(units, "float32")])
    return model


def red_and_green(red: int = 16, green: int = 12) -> np.ndarray:
    """Grey, with a red square in the top-left quadrant and a smaller green one bottom-right."""
    image = np.full((SIZE, SIZE, 3), 128.0, "float32")
    image[:red, :red] = [255, 0, 0]
    image[SIZE - green :, SIZE - green :] = [0, 255, 0]
    return image[None]


def share(heatmap: np.ndarray, quadrant: str) -> float:
    half = SIZE // 2
    rows = slice(0, half) if quadrant[0] == "top" else slice(half, SIZE)
    cols = slice(0, half) if quadrant[1] == "left" else slice(half, SIZE)
    return float(heatmap[rows, cols].sum() / heatmap.sum())


TOP_LEFT, BOTTOM_RIGHT = ("top", "left"), ("bottom", "right")


@pytest.mark.parametrize("head", ["softmax", "multilabel", "binary"])
def test_the_heat_lands_where_the_class_evidence_is(head):
    model = colour_model(head)
    assert gradcam.target_layer(model).name == "cells"  # the last spatial layer, 8x8
    image = red_and_green()
    # Binary: class 1 is z = red - green, class 0 is -z (the evidence for green).
    red, green = (1, 0) if head == "binary" else (RED, GREEN)
    for cls, where in ((red, TOP_LEFT), (green, BOTTOM_RIGHT), (None, TOP_LEFT)):
        (heat,) = gradcam.gradcam(model, image, class_index=cls)
        assert heat.shape == (SIZE, SIZE) and heat.max() == pytest.approx(1.0)
        assert share(heat, where) > 0.9, (head, cls, share(heat, where))


def test_maps_are_the_grad_cam_formula():
    """With a GAP -> Dense(4 I) head, d logit_c / d map = 4 / 64 on channel c only: the map of
    class c is channel c of the 8x8 map, upsampled bilinearly and divided by its maximum."""
    model = colour_model()
    images = np.concatenate([red_and_green(), red_and_green(8, 16)])
    cells = keras.Model(model.input, model.get_layer("cells").output)(images).numpy()
    for cls in (RED, GREEN):
        want = tf.image.resize(cells[..., cls : cls + 1], (SIZE, SIZE), "bilinear")[..., 0]
        want = want.numpy() / want.numpy().max(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(gradcam.gradcam(model, images, cls), want, atol=1e-6)
    # class_index=None explains each image's own top class: red, then green (the larger square).
    both = gradcam.gradcam(model, images)
    assert share(both[0], TOP_LEFT) > 0.9 and share(both[1], BOTTOM_RIGHT) > 0.9
    np.testing.assert_allclose(both, gradcam.gradcam(model, images, [RED, GREEN]), atol=1e-6)


def test_no_evidence_gives_an_all_zero_map_not_nan():
    grey = np.full((2, SIZE, SIZE, 3), 128.0, "float32")  # neither detector fires
    maps = gradcam.gradcam(colour_model(), grey)
    assert np.isfinite(maps).all() and not maps.any()


# --------------------------------------------------------------------------------------------------
# Errors and overlay.


def test_a_model_without_a_spatial_map_is_refused():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)  # 4-D, but before any weighted layer
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs, name="flat")
    with pytest.raises(ValueError, match=r"expected a model with a spatial feature map.*'flat'"):
        gradcam.target_layer(model)


def test_bad_images_and_class_indices():
    model = colour_model()
    image = red_and_green()
    with pytest.raises(
        ValueError, match=r"expected a batch of shape \(N, 32, 32, 3\).*\(32, 32, 3\)"
    ):
        gradcam.gradcam(model, image[0])
    with pytest.raises(ValueError, match=r"expected class indices in 0\.\.1, received \[2\]"):
        gradcam.gradcam(model, image, class_index=2)
    with pytest.raises(ValueError, match=r"expected None, an int or 1 ints"):
        gradcam.gradcam(model, image, class_index=[0, 1])
    with pytest.raises(ValueError, match=r"expected class indices in 0\.\.1"):
        gradcam.gradcam(colour_model("binary"), image, class_index=-1)


def test_overlay_blends_a_resized_heat_map_over_the_image():
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3)).astype("uint8")
    heat = np.zeros((8, 8), "float32")
    heat[:4, :4] = 1.0
    out = gradcam.overlay(image, heat)
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(gradcam.overlay(image, heat, alpha=0.0), image)
    # jet: 1 is dark red, 0 dark blue.
    colours = gradcam.overlay(np.zeros_like(image), heat, alpha=1.0)
    assert colours[0, 0, 0] > 100 and colours[0, 0, 2] == 0
    assert colours[-1, -1, 2] > 100 and colours[-1, -1, 0] == 0
    with pytest.raises(ValueError, match=r"heatmap: expected shape \(h, w\), received \(1, 8, 8\)"):
        gradcam.overlay(image, heat[None])
    with pytest.raises(ValueError, match=r"alpha: expected a number in \[0, 1\], received 2"):
        gradcam.overlay(image, heat, alpha=2)


# --------------------------------------------------------------------------------------------------
# The export's explain signature.


def test_explain_signature_matches_the_in_memory_model(tmp_path):
    model = tlkeras.build_model(
        "MobileNet", 3, weights=None, input_shape=(64, 64, 3), backbone_kwargs={"alpha": 0.25}
    )
    # Random-init MobileNet features are ~1e-16: a bias makes the top class unambiguous.
    model.get_layer("predictions").bias.assign([0.0, 1.0, 0.0])
    names = ["ant", "bee", "wasp"]
    result = savedmodel.export(
        model, "m", base_dir=tmp_path, class_names=names, verify=False, explain=True
    )
    assert result.signatures == (*signatures.SIGNATURES, signatures.EXPLAIN_SIGNATURE)
    meta = json.loads((result.path / layout.ASSETS_EXTRA / layout.METADATA_FILE).read_text())
    assert meta["signatures"]["explain"]["target"] == {
        "name": "conv_13",
        "layer": "conv_pw_13_relu",
    }

    loaded = exported.load_exported(result.path)
    images = [
        badfiles.encode(badfiles.picture((70, 50), badfiles.COLOURS[i], seed=i), fmt)
        for i, fmt in enumerate(["JPEG", "PNG"])
    ]
    out = loaded.explain_bytes(images)
    assert set(out) == set(signatures.EXPLAIN_OUTPUTS)
    pixels = decoding.reference_decode(images, (64, 64))
    assert out["heatmaps"].shape == (2, 64, 64)
    np.testing.assert_allclose(out["heatmaps"], gradcam.gradcam(model, pixels), atol=1e-4)
    served = loaded.predict_bytes(images)
    assert list(out["classes"]) == list(served["classes"][:, 0])
    np.testing.assert_allclose(out["scores"], served["scores"][:, 0], atol=1e-6)

    # An export without it: tests/scripts/test_predict_script.py (predict.py --explain, one line).
