"""Tests for tlkeras.workflows.sweep: the recommendation rule, one tiny sweep end to end, scripts/sweep.py."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from conftest import REPO, bad_input_cases, bad_input_env, check_bad_flags_fail_in_one_line

from tlkeras.workflows.sweep import sweep
from tlkeras.workflows.sweep_report import (
    FINE_TUNED,
    FROZEN,
    SCRATCH,
    SweepRow,
    binomial_noise,
    recommend,
)

SWEEP = REPO / "scripts" / "sweep.py"


def _row(mode, k, params, acc, loss=0.5):
    return SweepRow(mode, k, f"b{k}", params, acc, loss, None, 3, 1.0, "cached")


# noise at p~0.9 over 100 validation images is ~0.03
RECOMMEND = {
    "tie_goes_to_fewer_params": (
        [_row(FROZEN, 2, 900, 0.91), _row(FROZEN, 8, 300, 0.89), _row(FROZEN, 11, 100, 0.70)],
        (FROZEN, 8),
    ),
    "clear_winner_outside_noise": (
        [_row(FROZEN, 2, 900, 0.95), _row(FROZEN, 8, 300, 0.85), _row(FROZEN, 11, 100, 0.70)],
        (FROZEN, 2),
    ),
    "frozen_beats_fine_tuned_within_noise": (
        [_row(FROZEN, 5, 500, 0.90), _row(FINE_TUNED, 5, 1000, 0.92)],
        (FROZEN, 5),
    ),
    "scratch_is_never_recommended": (
        [_row(FROZEN, 5, 500, 0.60), _row(SCRATCH, None, 10, 0.99)],
        (FROZEN, 5),
    ),
}


@pytest.mark.parametrize("rows,expected", RECOMMEND.values(), ids=RECOMMEND.keys())
def test_recommend_takes_fewest_params_within_noise(rows, expected):
    chosen, best, noise = recommend(rows, num_validation=100)
    assert (chosen.mode, chosen.k) == expected
    assert best.mode != SCRATCH
    assert noise == pytest.approx(binomial_noise(best.val_accuracy, 100))
    assert chosen.val_accuracy >= best.val_accuracy - noise


@pytest.mark.parametrize("acc,n,expected", [(0.5, 100, 0.05), (1.0, 48, 0.02)])
def test_binomial_noise(acc, n, expected):
    assert binomial_noise(acc, n) == pytest.approx(expected, abs=0.005)


def test_recommend_needs_a_transferred_row():
    with pytest.raises(ValueError, match="frozen or fine-tuned"):
        recommend([_row(SCRATCH, None, 1, 0.5)], 10)


def _stripes(n: int = 48, size: int = 32, seed: int = 0):
    """Two learnable classes: horizontal vs vertical stripes, with noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    wave = (np.sin(np.arange(size) * 1.2) > 0).astype(np.float32) * 200
    x = np.empty((n, size, size, 3), np.float32)
    x[y == 0] = wave[None, :, None, None]
    x[y == 1] = wave[None, None, :, None]
    x += rng.normal(0, 30, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A "pretrained" backbone file: random weights stand in, a sweep only needs a file to load."""
    import keras

    from tlkeras.models.backbones import build_backbone

    keras.utils.set_random_seed(1)
    path = tmp_path_factory.mktemp("weights") / "tiny.weights.h5"
    build_backbone("MobileNet", (32, 32, 3), None, alpha=0.25).save_weights(path)
    return str(path)


def test_sweep_writes_table_plot_json_and_recommends_a_swept_k(tmp_path, tiny_pretrained):
    result = sweep(
        _stripes(),
        "MobileNet",
        [-1, 14],
        weights=tiny_pretrained,
        backbone_kwargs={"alpha": 0.25},
        image_size=32,
        fine_tune=True,
        epochs=2,
        fine_tune_epochs=1,
        scratch_epochs=1,
        validation_split=0.25,
        test_split=0.0,
        output_dir=tmp_path,
    )
    assert [(r.mode, r.k) for r in result.rows] == [
        (FROZEN, 13),
        (FINE_TUNED, 13),
        (FROZEN, 14),
        (FINE_TUNED, 14),
        (SCRATCH, None),
    ]
    assert result.num_blocks == 14 and result.num_validation == 12
    frozen = {r.k: r for r in result.curve(FROZEN)}
    assert frozen[14].trainable_params < frozen[13].trainable_params
    assert frozen[14].first_trainable_block == "-" and frozen[13].first_trainable_block == "conv_13"
    assert all(r.fast_path == "cached" for r in frozen.values())
    assert result.recommended in result.rows and result.recommended.mode != SCRATCH
    assert result.recommended.val_accuracy >= result.best.val_accuracy - result.noise

    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["recommended"]["k"] == result.recommended.k
    assert record["settings"]["ks"] == [13, 14]
    # Every row started from one head warm-up on the frozen backbone, as `train` does.
    warm_up = record["settings"]["head_warm_up"]
    assert warm_up["fast_path"] == "cached" and 1 <= warm_up["epochs_run"] <= 2
    with (tmp_path / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == [FROZEN, FINE_TUNED, FROZEN, FINE_TUNED, SCRATCH]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recommended" in result.summary()


def test_sweep_chooses_k_on_given_validation_data(tmp_path, tiny_pretrained):
    # The split error tells users to "pass validation data": sweep takes it (--validation_data).
    result = sweep(
        _stripes(40),
        "MobileNet",
        [14],
        weights=tiny_pretrained,
        backbone_kwargs={"alpha": 0.25},
        image_size=32,
        epochs=1,
        baseline_scratch=False,
        validation_data=_stripes(10, seed=1),
        test_split=0.0,
        output_dir=tmp_path,
    )
    assert result.num_validation == 10


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"ks": [0]}, ValueError, "ks: expected block indices in 1..14"),
        ({"ks": [15]}, ValueError, "ks: expected block indices in 1..14"),
        ({"ks": []}, ValueError, "ks: expected a non-empty list"),
        ({"weights": None}, ValueError, "weights: a sweep transfers"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"augment": True}, TypeError, "augment"),
    ],
)
def test_sweep_rejects_bad_arguments(tmp_path, tiny_pretrained, kwargs, error, match):
    args = {"ks": [5], "weights": tiny_pretrained, **kwargs}
    with pytest.raises(error, match=match):
        sweep(
            _stripes(16),
            "MobileNet",
            args.pop("ks"),
            backbone_kwargs={"alpha": 0.25},
            image_size=32,
            test_split=0.0,
            validation_split=0.25,
            output_dir=tmp_path,
            **args,
        )


BAD_FLAGS = {
    "ks_not_ints": (["--ks=a,b"], "--ks"),
    "unknown_flag": (["--kz=2"], "kz"),
    "bad_epochs": (["--epochs=0", "--weights=imagenet"], "epochs: expected an int >= 1"),
    "missing_folder": (["--weights=imagenet", "--data=/no/such"], "/no/such"),
}


def test_sweep_script_bad_flags_exit_2_with_one_line(tmp_path):
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "kh"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    check_bad_flags_fail_in_one_line(
        SWEEP, BAD_FLAGS, env, lambda name: [f"--output_dir={tmp_path / name}"]
    )


def test_sweep_bad_weights_files_kwargs_and_max_bad_fraction_end_in_one_line(tmp_path):
    cases = bad_input_cases(tmp_path, weights="imagenet", every_kind=False)
    env = bad_input_env(tmp_path, {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})

    def extra(name: str) -> list[str]:
        data = [] if "--data=" in " ".join(cases[name][0]) else ["--data=digits:0-2"]
        return [*data, "--ks=-1", "--epochs=1", f"--output_dir={tmp_path / name}"]

    check_bad_flags_fail_in_one_line(SWEEP, cases, env, extra)
