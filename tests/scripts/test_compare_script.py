"""scripts/compare.py: one table, a plot and comparison.json; one-line errors on bad flags."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import bad_input_cases, bad_input_env, check_bad_flags_fail_in_one_line, run_python

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare.py"


def _run(args, tmp_path, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home")}
    return run_python(SCRIPT, *args, env=env, timeout=timeout, cwd=tmp_path)


def test_compare_feature_extraction_and_partial(tmp_path):
    # weights=none keeps the test offline and short (no pre-training); the digits story is the
    # default and is covered by tests/workflows/test_transfer.py.
    out = tmp_path / "cmp"
    proc = _run(
        [
            "--weights=none",
            "--strategies=feature_extraction,partial",
            "--fine_tune_at=-3",
            "--epochs=1",
            "--fine_tune_epochs=1",
            "--noreport",  # the report's own tests cover it
            f"--output_dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "strategy" in proc.stdout and "partial (k=-3)" in proc.stdout
    saved = json.loads((out / "comparison.json").read_text())
    rows = {r["strategy"]: r for r in saved["rows"]}
    assert set(rows) == {"feature_extraction", "partial"}
    assert rows["feature_extraction"]["trainable_params"] < rows["partial"]["trainable_params"]
    assert (out / "comparison.png").stat().st_size > 0
    assert (out / "partial").is_dir() and (out / "feature_extraction").is_dir()


@pytest.mark.parametrize(
    "flag,match",
    [
        ("--strategies=partial,bogus", "expected a non-empty subset"),
        ("--epochs=many", "--epochs"),
        ("--weights=missing.h5", "no such file"),
    ],
)
def test_bad_flags_one_line_exit_2(tmp_path, flag, match):
    proc = _run([flag, "--data=digits:5-9"], tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]


def test_bad_weights_files_kwargs_and_max_bad_fraction_end_in_one_line(tmp_path):
    cases = bad_input_cases(tmp_path, every_kind=False)
    env = bad_input_env(tmp_path, os.environ)

    def extra(name: str) -> list[str]:
        given = " ".join(cases[name][0])
        data = [] if "--data=" in given else ["--data=digits:0-2"]
        return [*data, "--strategies=feature_extraction", f"--output_dir={tmp_path / name}"]

    check_bad_flags_fail_in_one_line(SCRIPT, cases, env, extra)
