"""An export and a run directory written before the subpackage reshape still load, predict the same
and resume (fixtures from tests/fixtures/make_legacy.py, run on the flat layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import tlkeras
from tlkeras import data, training

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"


def test_an_old_export_loads_and_predicts_the_same():
    exported = tlkeras.load_exported(LEGACY / "export" / "digits")
    images = np.load(LEGACY / "images.npy")
    expected = json.loads((LEGACY / "predictions.json").read_text())["probabilities"]
    probabilities = exported.predict_pixels(images)["probabilities"]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert exported.class_names == ["0", "1", "2"]


def test_an_old_run_directory_resumes_to_the_end(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    before = json.loads((run / "run_state.json").read_text())
    assert before["status"] == "running" and "2" not in before["phases"]
    # The same run as make_legacy.RUN_SCRIPT: the fingerprint must match for a resume.
    d = data.load("digits:0-2", image_size=(32, 32), batch_size=64, seed=0)
    m = tlkeras.build_model(
        "MobileNet",
        3,
        strategy="full",
        weights=None,
        input_shape=(32, 32, 3),
        backbone_kwargs={"alpha": 0.1},
    )
    c = training.TrainConfig(
        epochs=1,
        fine_tune_epochs=6,
        early_stopping_patience=0,
        converge_head=False,
        head_solver="gradient",
    )
    result = training.fit(m, d, c, run_dir=run, verbose=0, report=False)
    assert "Resuming" in capsys.readouterr().out
    state = json.loads((run / "run_state.json").read_text())
    assert state["status"] == "done" and state["resumes"] == 1
    assert state["phases"]["2"]["resumed_at_epoch"] >= 2
    history = json.loads((run / "history.json").read_text())["history"]
    assert history["epoch"] == list(range(7))
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
