import json
import os
import re

import keras
import numpy as np
import pytest
from conftest import MOBILENET_WEIGHTS, needs_shared_weights, run_python, small_input

import tlkeras
from tlkeras.models.backbones import BACKBONES, FAMILIES, PREPROCESS_MODES

KERAS_APPLICATION_MODELS = sorted(n for n in dir(keras.applications) if n[0].isupper())


def test_table_covers_every_keras_application():
    assert tlkeras.backbone_names() == KERAS_APPLICATION_MODELS
    assert len(tlkeras.backbone_names()) == 40


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_rows_are_consistent(name):
    spec = tlkeras.get_backbone(name)
    assert spec.constructor is getattr(keras.applications, name)
    assert spec.preprocess_mode in PREPROCESS_MODES
    assert callable(spec.preprocess)
    assert spec.min_size <= spec.default_size
    assert spec.family in FAMILIES.values()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_preprocess_matches_the_family_mode(family):
    fam = FAMILIES[family]
    x = np.full((1, 2, 2, 3), 255.0, dtype="float32")
    y = np.asarray(fam.preprocess(x.copy()))
    expected = {
        "tf": np.ones_like(x),
        "internal": x,
        "torch": (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
        "caffe": 255.0 - np.array([103.939, 116.779, 123.68]),  # BGR order
    }[fam.preprocess_mode]
    np.testing.assert_allclose(y, np.broadcast_to(expected, y.shape), rtol=1e-5)


def test_unknown_backbone_lists_names_and_suggests():
    with pytest.raises(
        ValueError,
        match=r"expected one of .*MobileNetV2.*received 'mobilenetv2'.*did you mean 'MobileNetV2'",
    ):
        tlkeras.get_backbone("mobilenetv2")
    with pytest.raises(TypeError):
        tlkeras.get_backbone(None)


@pytest.mark.parametrize("name", ["InceptionV3", "Xception", "MobileNet"])
def test_input_below_minimum_is_rejected(name):
    min_size = tlkeras.get_backbone(name).min_size
    with pytest.raises(ValueError, match=rf">= {min_size}, received {min_size - 1}x{min_size}"):
        tlkeras.build_backbone(name, (min_size - 1, min_size, 3), weights=None)


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1), (64.0, 64, 3)])
def test_bad_input_shapes(shape):
    with pytest.raises(ValueError, match="input_shape"):
        tlkeras.build_backbone("MobileNet", shape, weights=None)


def test_reserved_and_unknown_kwargs():
    with pytest.raises(ValueError, match="include_top"):
        tlkeras.build_backbone("MobileNet", (32, 32, 3), weights=None, include_top=True)
    with pytest.raises(TypeError, match="backbone_kwargs for MobileNet"):
        tlkeras.build_backbone("MobileNet", (32, 32, 3), weights=None, no_such_option=1)


def test_missing_weights_file():
    with pytest.raises(FileNotFoundError, match="no such file"):
        tlkeras.build_backbone("MobileNet", (32, 32, 3), weights="/nonexistent/w.h5")


def test_kwargs_pass_through():
    base = tlkeras.build_backbone("MobileNet", small_input("MobileNet"), weights=None, alpha=0.25)
    assert base.get_layer("conv1").filters == 8  # 32 * 0.25


@needs_shared_weights
def test_weights_file_path_loads_the_file():
    import h5py

    base = tlkeras.build_backbone(
        "MobileNet", (224, 224, 3), weights=str(MOBILENET_WEIGHTS), alpha=0.25
    )
    with h5py.File(MOBILENET_WEIGHTS) as f:
        expected = f["conv_pw_13/conv_pw_13/kernel:0"][()]
    np.testing.assert_array_equal(base.get_layer("conv_pw_13").kernel.numpy(), expected)


_IMAGENET_SCRIPT = """
import json, sys
import numpy as np, h5py, keras
import tlkeras
model = tlkeras.build_model("MobileNet", 2, backbone_kwargs={"alpha": 0.25}, weights="imagenet")
random = tlkeras.build_model("MobileNet", 2, backbone_kwargs={"alpha": 0.25}, weights=None)
out = {}
with h5py.File(sys.argv[1]) as f:
    for layer in ("conv1", "conv_dw_7", "conv_pw_13"):
        got = model.get_layer("backbone").get_layer(layer).get_weights()[0]
        rnd = random.get_layer("backbone").get_layer(layer).get_weights()[0]
        want = f[f"{layer}/{layer}/" + ("depthwise_kernel:0" if "dw" in layer else "kernel:0")][()]
        out[layer] = [bool(np.array_equal(got, want)), bool(np.array_equal(rnd, want))]
print(json.dumps(out))
"""


@needs_shared_weights
@pytest.mark.slow
def test_imagenet_weights_through_the_keras_cache(keras_home):
    env = {**os.environ, "KERAS_HOME": str(keras_home)}
    proc = run_python("-c", _IMAGENET_SCRIPT, MOBILENET_WEIGHTS, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for layer, (matches_file, random_matches) in result.items():
        assert matches_file, f"{layer}: loaded weights differ from the file"
        assert not random_matches, f"{layer}: random init equals the file"


_MISSING_SCRIPT = """
import tlkeras
tlkeras.build_model("MobileNetV2", 2, weights="imagenet", input_shape=(96, 96, 3))
"""


@pytest.mark.slow
def test_missing_imagenet_weights_names_the_file(tmp_path):
    env = {**os.environ, "KERAS_HOME": str(tmp_path)}
    proc = run_python("-c", _MISSING_SCRIPT, env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in last
    assert f"{tmp_path}/models/" in last


def test_a_bad_weights_file_is_named_with_what_is_wrong(tmp_path):
    import badfiles

    from tlkeras.models.backbones import BadFileError, build_backbone, file_problem

    for name, path in badfiles.write_bad_weights(tmp_path).items():
        assert badfiles.BAD_WEIGHTS[name] in file_problem(path), name
        with pytest.raises(BadFileError) as info:
            build_backbone("MobileNet", (32, 32, 3), str(path), alpha=0.25)
        message = str(info.value)
        assert message.startswith(f"weights: {str(path)!r} {badfiles.BAD_WEIGHTS[name]}")
        assert message.endswith("delete it and download it again"), message
    # The expected size is HDF5's own record of the complete file.
    full = len(badfiles.hdf5_bytes())
    assert f"{full // 2} of {full} bytes" in file_problem(tmp_path / "truncated.h5")
    good = tmp_path / "good.h5"
    good.write_bytes(badfiles.hdf5_bytes())
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(tmp_path / "good.keras")
    assert file_problem(good) is None and file_problem(tmp_path / "good.keras") is None


@needs_shared_weights
def test_a_truncated_download_of_the_real_weights_reports_the_full_size(tmp_path):
    from tlkeras.models.backbones import file_problem

    cut = tmp_path / MOBILENET_WEIGHTS.name
    cut.write_bytes(MOBILENET_WEIGHTS.read_bytes()[:1_000_000])
    size = MOBILENET_WEIGHTS.stat().st_size
    assert f"is truncated: 1000000 of {size} bytes" in file_problem(cut)


_BAD_CACHE_SCRIPT = """
import tlkeras
tlkeras.build_model("MobileNet", 2, backbone_kwargs={"alpha": 0.25}, weights="imagenet")
"""


@pytest.mark.slow
def test_a_truncated_file_in_the_keras_cache_is_named(tmp_path):
    import badfiles

    cached = badfiles.truncated_keras_cache(tmp_path)
    proc = run_python("-c", _BAD_CACHE_SCRIPT, env={**os.environ, "KERAS_HOME": str(tmp_path)})
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tlkeras.models.backbones.BadFileError: ImageNet weights for MobileNet")
    assert f"the Keras cache file {str(cached)!r} is truncated: " in last
    assert "delete it and Keras downloads it again" in last


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("MobileNet", {"alpha": "zero"}, "MobileNet expects alpha to be a number (default 1.0), "),
        ("MobileNet", {"depth_multiplier": 1.5}, "depth_multiplier to be an int (default 1)"),
        ("MobileNetV3Small", {"minimalistic": "yes"}, "minimalistic to be True or False"),
    ],
)
def test_backbone_kwargs_of_the_wrong_type_name_the_key_and_the_type(name, kwargs, match):
    from tlkeras.models.backbones import build_backbone, check_backbone_kwargs

    with pytest.raises(ValueError, match=re.escape(match)):
        build_backbone(name, (32, 32, 3), None, **kwargs)
    check_backbone_kwargs("MobileNet", {"alpha": 1, "dropout": 0.1, "name": "m"})  # int for float
