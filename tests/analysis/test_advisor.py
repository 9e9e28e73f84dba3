"""Tests for tlkeras.analysis.advisor: the case table, LogME, the probe, ranking, and scripts/advise.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import (
    HYMENOPTERA,
    MOBILENET_WEIGHTS,
    REPO,
    bad_input_cases,
    bad_input_env,
    check_bad_flags_fail_in_one_line,
    needs_hymenoptera,
    needs_shared_weights,
    run_python,
)

from tlkeras import cli
from tlkeras.analysis import advisor, transferability
from tlkeras.analysis.advisor import AdvisorConfig, Case

ADVISE = REPO / "scripts" / "advise.py"


# ---------------------------------------------------------------------------------------------
# The mapping: size and similarity thresholds -> case -> recipe

DECIDE = [
    # (num_images, probe gain, config overrides, expected case)
    (5000, 0.9, {}, Case.LARGE_SIMILAR),
    (5000, 0.1, {}, Case.LARGE_DISSIMILAR),
    (200, 0.9, {}, Case.SMALL_SIMILAR),
    (200, 0.1, {}, Case.SMALL_DISSIMILAR),
    (1000, 0.5, {}, Case.SMALL_SIMILAR),  # both thresholds are inclusive
    (1001, 0.4999, {}, Case.LARGE_DISSIMILAR),
    (200, -0.3, {}, Case.SMALL_DISSIMILAR),  # pretrained features worse than random
    (200, 0.6, {"small_max_images": 100}, Case.LARGE_SIMILAR),
    (5000, 0.6, {"min_probe_gain": 0.7}, Case.LARGE_DISSIMILAR),
]


@pytest.mark.parametrize("num_images,gain,overrides,expected", DECIDE)
def test_decide_maps_size_and_similarity_to_the_four_cases(num_images, gain, overrides, expected):
    assert advisor.decide(num_images, gain, AdvisorConfig(**overrides)) is expected


RECIPES = [
    # (case, num_blocks, strategy, fine_tune_at, phase-2 learning rate, augment)
    (Case.LARGE_SIMILAR, 14, "partial", 10, 1e-4, False),  # last quarter trains
    (Case.LARGE_DISSIMILAR, 14, "full", None, 1e-5, False),
    (Case.SMALL_SIMILAR, 14, "feature_extraction", None, None, True),
    (Case.SMALL_DISSIMILAR, 14, "partial", 9, 1e-4, True),  # last third trains
    (Case.SMALL_DISSIMILAR, 3, "partial", 2, 1e-4, True),
    (Case.LARGE_SIMILAR, 2, "partial", 1, 1e-4, False),
]


@pytest.mark.parametrize("case,num_blocks,strategy,k,ft_lr,augment", RECIPES)
def test_recipe_of_each_case(case, num_blocks, strategy, k, ft_lr, augment):
    r = advisor.recipe(case, num_blocks)
    assert (r.strategy, r.fine_tune_at, r.fine_tune_learning_rate, r.augment) == (
        strategy,
        k,
        ft_lr,
        augment,
    )
    assert r.learning_rate == AdvisorConfig().learning_rate


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"small_max_images": 0}, "small_max_images"),
        ({"min_probe_gain": 1.5}, "min_probe_gain"),
        ({"small_dissimilar_trainable_fraction": 0.0}, "small_dissimilar_trainable_fraction"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"probe_folds": 1}, "probe_folds"),
        ({"max_images": True}, "max_images"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        AdvisorConfig(**overrides)


# ---------------------------------------------------------------------------------------------
# Scores


def _reference_logme(f: np.ndarray, y: np.ndarray) -> float:
    """The straightforward d x d form of You et al.'s Algorithm 1 (no SVD shortcut)."""
    n, d = f.shape
    s, v = np.linalg.eigh(f.T @ f)
    s = np.clip(s, 0, None)
    out = []
    for c in np.unique(y):
        t = (y == c).astype(float)
        alpha, beta = 1.0, 1.0
        for _ in range(200):
            a_inv = v @ np.diag(1 / (alpha + beta * s)) @ v.T
            m = beta * a_inv @ f.T @ t
            gamma = np.sum(beta * s / (alpha + beta * s))
            alpha, beta = gamma / (m @ m), (n - gamma) / np.sum((t - f @ m) ** 2)
        a_inv = v @ np.diag(1 / (alpha + beta * s)) @ v.T
        m = beta * a_inv @ f.T @ t
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * s))
            - beta / 2 * np.sum((t - f @ m) ** 2)
            - alpha / 2 * (m @ m)
            - n / 2 * np.log(2 * np.pi)
        )
        out.append(evidence / n)
    return float(np.mean(out))


def _separable(n: int, d: int, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, d)) * 2.0
    return rng.normal(size=(n, d)) + centers[y], y


@pytest.mark.parametrize("n,d", [(120, 16), (40, 64)])  # more samples than dims, and fewer
def test_logme_matches_the_reference_form_and_prefers_true_labels(n, d):
    f, y = _separable(n, d)
    score = transferability.logme(f, y)
    assert score == pytest.approx(_reference_logme(f, y), abs=2e-3)
    shuffled = np.random.default_rng(1).permutation(y)
    assert score > transferability.logme(f, shuffled) + 0.3
    assert transferability.logme(f * 1000.0, y) == pytest.approx(score, abs=1e-4)  # scale-invariant


@pytest.mark.parametrize(
    "features,labels",
    [
        (np.zeros((4, 3)), np.zeros(4, int)),
        (np.zeros((4,)), np.arange(4)),
        (np.zeros((3, 2)), [0, 1]),
    ],
)
def test_logme_rejects_bad_inputs(features, labels):
    with pytest.raises(ValueError, match="logme: expected"):
        transferability.logme(features, np.asarray(labels))


def test_probe_accuracy_separable_beats_shuffled_and_needs_two_per_class():
    f, y = _separable(90, 8, classes=2)
    acc, _ = transferability.probe_accuracy(f, y)
    shuffled, _ = transferability.probe_accuracy(f, np.random.default_rng(0).permutation(y))
    assert acc > 0.9 and shuffled < 0.75
    with pytest.raises(ValueError, match="at least 2 images in every class"):
        transferability.probe_accuracy(f[:5], np.array([0, 0, 0, 0, 1]))


@pytest.mark.parametrize(
    "acc,random_acc,chance,expected",
    [(0.85, 0.46, 0.5, 0.7), (0.85, 0.6, 0.5, 0.625), (0.5, 0.6, 0.5, -0.25), (1.0, 1.0, 0.5, 0.0)],
)
def test_probe_gain(acc, random_acc, chance, expected):
    assert transferability.probe_gain(acc, random_acc, chance) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("MobileNet", [("MobileNet", {}, "imagenet")]),
        (
            "MobileNet(alpha=0.25)@/w.h5; MobileNetV2(alpha=0.35,include_preprocessing=True)",
            [
                ("MobileNet", {"alpha": 0.25}, "/w.h5"),
                ("MobileNetV2", {"alpha": 0.35, "include_preprocessing": True}, "imagenet"),
            ],
        ),
        ("NASNetMobile@source:digits:0-4", [("NASNetMobile", {}, "source:digits:0-4")]),
    ],
)
def test_parse_candidates(text, expected):
    assert cli.parse_candidates(text) == expected


@pytest.mark.parametrize("text", ["", ";", "Mobile Net", "MobileNet(alpha)"])
def test_parse_candidates_rejects_bad_text(text):
    with pytest.raises(ValueError, match="--candidates"):
        cli.parse_candidates(text)


def test_advise_needs_pretrained_weights():
    data = (np.zeros((8, 32, 32, 3), np.uint8), np.array([0, 1] * 4))
    with pytest.raises(ValueError, match="weights: advise compares"):
        advisor.advise(data, "MobileNet", weights=None)


# ---------------------------------------------------------------------------------------------
# Real weights: pretrained features transfer better than random ones


@pytest.fixture(scope="module")
def hymenoptera_128():
    from tlkeras.data.sources import load

    return load(HYMENOPTERA, image_size=128, validation_split=0.0, test_split=0.0)


@needs_shared_weights
@needs_hymenoptera
@pytest.mark.slow
def test_score_ranks_pretrained_backbone_above_random(hymenoptera_128):
    config = AdvisorConfig(max_images=80)
    ranking = advisor.rank_backbones(
        hymenoptera_128,
        [
            ("MobileNet", {"alpha": 0.25}, None),
            ("MobileNet", {"alpha": 0.25}, str(MOBILENET_WEIGHTS)),
        ],
        config=config,
    )
    assert [r.weights for r in ranking] == [str(MOBILENET_WEIGHTS), None]
    assert ranking[0].logme > ranking[1].logme
    assert "random init" in advisor.ranking_table(ranking)


@needs_shared_weights
@needs_hymenoptera
@pytest.mark.slow
def test_advise_on_ants_and_bees_reports_its_evidence(hymenoptera_128):
    advice = advisor.advise(
        hymenoptera_128,
        "MobileNet",
        weights=str(MOBILENET_WEIGHTS),
        backbone_kwargs={"alpha": 0.25},
        config=AdvisorConfig(max_images=80),
    )
    assert advice.small and advice.num_images == 245 and advice.images_scored == 80
    assert advice.logme > advice.logme_random
    assert advice.probe_accuracy > advice.probe_accuracy_random
    assert advice.case in (Case.SMALL_SIMILAR, Case.SMALL_DISSIMILAR)
    assert advice.num_blocks == 14
    text = advice.summary()
    for needle in ("case ", "245 labelled images", "LogME", "linear probe", "<= 1000"):
        assert needle in text
    record = json.loads(json.dumps(advice.to_dict()))
    assert record["case"] == int(advice.case) and record["strategy"] == advice.strategy


# ---------------------------------------------------------------------------------------------
# scripts/advise.py


def _env(tmp_path):
    # TF_CPP_MIN_LOG_LEVEL=3: a caller's lower level lets a CUDA-probe line through on GPU-less hosts.
    return {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"), "TF_CPP_MIN_LOG_LEVEL": "3"}


BAD_FLAGS = {
    "gain_out_of_range": (["--min_probe_gain=2"], "min_probe_gain"),
    "bad_candidates": (["--candidates=Mobile Net"], "--candidates"),
    "bad_kwargs": (["--backbone_kwargs=alpha"], "--backbone_kwargs"),
    "unknown_backbone": (["--backbone=NoSuchNet"], "backbone"),
    "unknown_flag": (["--dat=x"], "dat"),
    "missing_folder": (["--data=/no/such/folder", "--weights=imagenet"], "/no/such/folder"),
}


def test_advise_script_bad_flags_exit_2_with_one_line(tmp_path):
    check_bad_flags_fail_in_one_line(ADVISE, BAD_FLAGS, _env(tmp_path))


@pytest.mark.slow
def test_advise_bad_weights_files_kwargs_and_max_bad_fraction_end_in_one_line(tmp_path):
    cases = bad_input_cases(tmp_path, weights="imagenet", every_kind=False)

    def extra(name: str) -> list[str]:
        return [] if "--data=" in " ".join(cases[name][0]) else ["--data=digits:0-2"]

    check_bad_flags_fail_in_one_line(ADVISE, cases, bad_input_env(tmp_path, _env(tmp_path)), extra)


@needs_shared_weights
@needs_hymenoptera
@pytest.mark.slow
def test_advise_script_prints_a_case_and_writes_json(tmp_path):
    out = tmp_path / "advice.json"
    proc = run_python(
        ADVISE,
        f"--data={HYMENOPTERA}",
        "--backbone=MobileNet",
        "--backbone_kwargs=alpha=0.25",
        f"--weights={MOBILENET_WEIGHTS}",
        "--image_size=96",
        "--max_images=60",
        f"--output={out}",
        env=_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("case ") and "evidence:" in proc.stdout
    record = json.loads(out.read_text())["advice"]
    assert record["case"] in (1, 2, 3, 4) and record["num_images"] == 245
