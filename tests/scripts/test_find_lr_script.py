"""Tests for scripts/find_lr.py: bad flags end in one line; one cheap run end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import (
    MOBILENET_WEIGHTS,
    REPO,
    check_bad_flags_fail_in_one_line,
    needs_shared_weights,
    run_python,
)

FIND_LR = REPO / "scripts" / "find_lr.py"
# What every case passes, so a case that got past its check would still be cheap.
CHEAP = ["--data=digits:0-2", "--weights=none", "--image_size=32"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_HOME": str(tmp_path / "keras_home")}
    env.pop("TF_CONFIG", None)
    return env


# One case per path a bad value takes (each is a process importing TensorFlow): the sweep's own
# check (its every argument: tests/fitting/test_lr_finder.py), absl's enum, the library's strategy check.
BAD_FLAGS = {
    "min_lr_not_below_max_lr": (["--min_lr=0.1", "--max_lr=0.1"], "max_lr: expected a number >"),
    "bad_strategy": (["--strategy=everything"], "--strategy"),
    "fine_tune_at_without_partial": (["--fine_tune_at=3"], "fine_tune_at:"),
}


def test_bad_flags_exit_2_with_one_line_and_no_traceback(tmp_path):
    check_bad_flags_fail_in_one_line(
        FIND_LR,
        BAD_FLAGS,
        _env(tmp_path),
        lambda name: [*CHEAP, f"--output={tmp_path / name / 'lr.png'}"],
    )


@needs_shared_weights
def test_one_cheap_sweep_prints_the_suggestion_and_writes_the_plot(tmp_path):
    plot = tmp_path / "out" / "lr_find.png"
    # The head on cached features of the real MobileNet (the default strategy): a real curve, and
    # no end-to-end training graph to trace (random weights give features of ~1e-18 there).
    out = run_python(
        FIND_LR,
        "--data=digits:0-2",
        f"--weights={MOBILENET_WEIGHTS}",
        "--image_size=32",
        "--steps=30",  # 20 ended at its first tenth with the training split permuted
        "--min_lr=1e-4",
        "--max_lr=100",
        f"--output={plot}",
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "Suggested learning rate: " in out.stdout and "/ 10" in out.stdout
    record = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert 1e-4 <= record["suggestion"] <= 100
    assert record["strategy"] == "feature_extraction" and record["on_cached_features"] is True
    assert record["plot"] == str(plot) and plot.read_bytes()[:4] == b"\x89PNG"
