"""tlkeras.models.builder: the dtype policies a model is built in (the rest is covered by the strategy,
blocks and task tests)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tlkeras
from tlkeras.models.builder import DTYPE_POLICIES, get_spec

SMALL = dict(weights=None, input_shape=(32, 32, 3), backbone_kwargs={"alpha": 0.25})


@pytest.mark.parametrize("policy", DTYPE_POLICIES)
def test_every_policy_computes_in_its_dtype_with_float32_in_and_out(policy):
    model = tlkeras.build_model("MobileNet", 3, strategy="full", dtype_policy=policy, **SMALL)
    compute = "float32" if policy == "float32" else policy.split("_")[1]
    assert get_spec(model).dtype_policy == policy
    convs = [x for x in model.get_layer("backbone").layers if isinstance(x, keras.layers.Conv2D)]
    assert convs and all(c.compute_dtype == compute for c in convs)
    assert all(v.dtype == "float32" for v in model.trainable_variables)  # float32 master weights
    # The input and the head's output stay float32 (a stable softmax, a float32-in export).
    assert model.input.dtype == "float32" and model.get_layer("predictions").compute_dtype == (
        "float32"
    )
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    probabilities = keras.ops.convert_to_numpy(model(x, training=False))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # Building does not leave the global policy changed for the caller's next model.
    assert keras.config.dtype_policy().name == "float32"


def test_a_bad_policy_is_refused_before_anything_is_built():
    with pytest.raises(ValueError, match=r"dtype_policy: expected one of .*received 'float16'"):
        tlkeras.build_model("MobileNet", 3, dtype_policy="float16", **SMALL)
    assert keras.config.dtype_policy().name == "float32"


def test_the_global_policy_is_restored_when_building_fails():
    with pytest.raises((TypeError, ValueError)):
        # A bad backbone argument fails inside the policy's scope.
        tlkeras.build_model(
            "MobileNet",
            3,
            dtype_policy="mixed_bfloat16",
            weights=None,
            input_shape=(32, 32, 3),
            backbone_kwargs={"no_such_argument": 1},
        )
    assert keras.config.dtype_policy().name == "float32"
