"""The offline transfer story and the strategy comparison."""

from __future__ import annotations

import json

import pytest

from tlkeras.models import weights as weights_lib  # noqa: F401
from tlkeras.workflows import training, transfer
from tlkeras.workflows.training import TrainConfig

KWARGS = {"alpha": 0.25}


def test_transfer_story_table(home, tmp_path):
    config = TrainConfig(epochs=1, fine_tune_epochs=1, early_stopping_patience=0)
    # Two strategies keep the test short; scripts/compare.py's test runs the other two.
    strategies = ("scratch", "feature_extraction")
    table = transfer.transfer_story(
        strategies=strategies, config=config, output_dir=tmp_path / "story", report=False
    )
    assert [r.strategy for r in table.rows] == list(strategies)
    params = {r.strategy: r.trainable_params for r in table.rows}
    assert params["feature_extraction"] < params["scratch"] / 10  # the head alone
    assert table.row("scratch").weights is None
    assert table.row("feature_extraction").weights == table.extra["weights"]
    for r in table.rows:  # each row reports its own run's test-split accuracy
        run_metrics = json.loads((tmp_path / "story" / r.strategy / "metrics.json").read_text())
        assert r.accuracy == pytest.approx(run_metrics["accuracy"]) and r.wall_seconds > 0
    assert table.extra["source"] == "digits:0-4" and table.extra["target"] == "digits:5-9"
    text = str(table)
    assert "feature_extraction" in text and "test accuracy" in text
    paths = table.save(tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert [r["strategy"] for r in saved["rows"]] == list(strategies)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_strategies_rejects_unknown_strategy(home):
    from tlkeras.data.sources import load

    data = load("digits:5-9", image_size=(32, 32))
    with pytest.raises(ValueError, match="expected a non-empty subset"):
        transfer.compare_strategies(data, weights=None, strategies=["bogus"])


@pytest.mark.parametrize(
    "baselines, source, expected",
    [
        (None, "digits:5-9", True),
        (None, "/photos", False),
        (True, "/photos", True),
        (False, "digits", False),
    ],
)
def test_baselines_are_on_by_default_only_for_the_embedded_digits(baselines, source, expected):
    assert transfer.wants_baselines(baselines, source) is expected


# One epoch of a random-init MobileNet on digits 0-2 at 32 px: the baselines' machinery, quickly.
TINY_RUN = {
    "data_source": "digits:0-2",
    "weights": None,
    "strategy": "scratch",
    "image_size": 32,
    "epochs": 1,
    "fine_tune_epochs": 0,
    "export_dir": None,
    "report": False,
}


def test_train_with_baselines_scores_scratch_and_pixels_on_the_run_split(tmp_path, capsys):
    # The transferred run on cached features (one solve): only the baseline trains end to end.
    run = {**TINY_RUN, "strategy": "feature_extraction"}
    result = transfer.train_with_baselines(output_dir=tmp_path / "run", seed=3, **run)
    record = json.loads((result.run_dir / transfer.BASELINES_FILE).read_text())
    test_images = sum(result.metrics["counts"]["test"].values())
    assert record["test_images"] == test_images
    assert record["transferred"]["accuracy"] == result.metrics["accuracy"]
    assert record["scratch"]["epochs"] == 1  # the same budget: 1 epoch end to end
    # Accuracies are whole numbers of the same test images.
    for name in ("scratch", "pixels"):
        correct = record[name]["accuracy"] * test_images
        assert abs(correct - round(correct)) < 1e-6
    # Digits 0-2 are linearly separable from their 8x8 pixels.
    assert record["pixels"]["accuracy"] >= 0.9 and record["pixels"]["pixels"] == "8x8 grey"
    out = capsys.readouterr().out
    assert "same network from scratch (1 epoch)" in out and "logistic regression" in out


def test_train_with_baselines_off_trains_once(tmp_path, monkeypatch):
    # The branch alone: train() itself is what the test above runs (a stub here saves a run).
    calls = []

    def train(data_source, **kwargs):
        calls.append((data_source, kwargs))
        return training.RunResult(None, {}, {}, tmp_path)

    monkeypatch.setattr(transfer.training, "train", train)
    result = transfer.train_with_baselines(baselines=False, output_dir=tmp_path, **TINY_RUN)
    assert len(calls) == 1 and calls[0][1]["output_dir"] == tmp_path
    assert result.run_dir == tmp_path and not (tmp_path / transfer.BASELINES_FILE).exists()
