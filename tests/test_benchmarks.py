"""Smoke tests of the benchmark machinery (``benchmarks/``) on tiny synthetic data.

They check that the split is shared and stratified, that bad settings are refused, and that
``benchmarks/run.py --quick`` runs every contender in its own process and writes the report. They
never assert a time: timings are the benchmark's business, not the tests'.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_python
from PIL import Image

BENCHMARKS = REPO / "benchmarks"


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


common = _load_common()


def _image_folder(root: Path, per_class: dict[str, int], size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for j in range(n):
            # Two visibly different classes: bright noise vs dark noise.
            pixels = rng.random((size, size, 3)) * (255 if i == 0 else 100)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{j}.jpg")
    (root / "ants" / ".DS_Store").write_bytes(b"\0\1")  # not an image: never copied
    return root


@pytest.mark.parametrize(("n_ants", "n_bees"), [(10, 10), (20, 12)])
def test_make_split_is_stratified_disjoint_and_complete(tmp_path, n_ants, n_bees):
    data = _image_folder(tmp_path / "data", {"ants": n_ants, "bees": n_bees})
    config = common.BenchConfig(data=str(data), weights=None)
    counts = common.make_split(config, tmp_path / "split")

    assert set(counts) == {"train", "val", "test"}
    names = {
        split: {
            p.relative_to(tmp_path / "split" / split)
            for p in (tmp_path / "split" / split).rglob("*.jpg")
        }
        for split in counts
    }
    assert sum(len(v) for v in names.values()) == n_ants + n_bees
    assert not (
        names["train"] & names["val"]
        or names["train"] & names["test"]
        or names["val"] & names["test"]
    )
    for split in ("val", "test"):
        # Stratified: each class keeps its share (within one image) in every held-out split.
        total = sum(counts[split].values())
        expected = total * n_ants / (n_ants + n_bees)
        assert abs(counts[split]["ants"] - expected) <= 1


def test_make_split_is_the_same_for_the_same_seed(tmp_path):
    data = _image_folder(tmp_path / "data", {"ants": 12, "bees": 12})
    config = common.BenchConfig(data=str(data), weights=None)
    common.make_split(config, tmp_path / "a")
    common.make_split(config, tmp_path / "b")
    listing = [
        sorted(str(p.relative_to(d)) for p in d.rglob("*.jpg"))
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert listing[0] == listing[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs: expected an int >= 1"),
        ({"batch_size": 2.5}, "batch_size: expected an int >= 1"),
        ({"patience": -1}, "patience: expected an int >= 0"),
        ({"test_split": 1.5}, "test_split: expected a fraction"),
        ({"validation_split": 0.6, "test_split": 0.5}, "expected a sum below 1"),
        ({"data": "/no/such/folder"}, "data: expected a folder"),
        ({"weights": "/no/such/weights.h5"}, "weights: expected a weights file"),
    ],
)
def test_bench_config_rejects_bad_settings(tmp_path, kwargs, match):
    kwargs = {"data": str(tmp_path), "weights": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        common.BenchConfig(**kwargs)


def _run_bench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_python(BENCHMARKS / "run.py", *args, cwd=REPO, timeout=timeout)


def test_bad_flag_value_is_one_line_and_exit_2(tmp_path):
    proc = _run_bench("--quick", f"--data={tmp_path / 'missing'}", "--weights=none")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data: expected a folder" in lines[0]


def test_quick_run_machinery_on_tiny_synthetic_data(tmp_path):
    data = _image_folder(tmp_path / "data", {"ants": 10, "bees": 10})
    output = tmp_path / "BENCHMARKS.md"
    proc = _run_bench(
        "--quick",
        f"--data={data}",
        "--weights=none",
        "--image_size=32",
        "--epochs=1",
        "--fine_tune_epochs=1",
        "--batch_size=8",
        "--noinference",
        f"--output={output}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every contender ran in its own worker process.
    for worker in (
        "forward",
        "peer_0",
        "tlkeras_frozen_0",
        "tlkeras_frozen_clean_0",
        "tlkeras_two_phase_0",
    ):
        assert f"{worker} " in proc.stdout
    text = output.read_text()
    for needle in (
        "# Benchmarks: tlkeras vs the plain Keras recipe",
        "shared 2-core machine",
        "| peer (Keras guide) |",
        "| tlkeras (default: augment on) | cached_views |",
        "| tlkeras (augment off) | cached |",
        "lower bound: one forward pass over train",
        "## Targets (issue 7)",
        "Frozen phase ≥ 8×",
        "Two-phase ≥ 3×",
        "Accuracy ≥ 90 %",
        "## Observed difference: BatchNormalization",
        "Not run (`--noinference`)",
    ):
        assert needle in text, needle
    # The report names the split both contenders shared: 20 images, 12 train / 4 val / 4 test.
    assert "train 12" in text and "val 4" in text and "test 4" in text


def test_named_sections_are_replaced_in_place_and_kept_by_a_rewrite(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nmain tables\n")
    common.write_section(path, "distribute", "## Distributed\nfirst")
    common.write_section(path, "distribute", "## Distributed\nsecond")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nmain tables\n")
    assert "second" in text and "first" not in text and text.count("## Distributed") == 1
    kept = common.kept_sections(path)
    assert kept.startswith("<!-- section:distribute begin -->") and "second" in kept
    assert "main tables" not in kept


def test_defaults_targets_are_judged_from_the_numbers_given():
    # A subprocess: benchmarks/defaults.py defines absl flags at import, as scripts do.
    code = """
import defaults
runs = {"feature_extraction": {
    "recipe": [{"seconds": 60.0, "accuracy": 0.60}, {"seconds": 60.0, "accuracy": 0.62}],
    "tlkeras": [{"seconds": 20.0, "accuracy": 0.80}, {"seconds": 20.0, "accuracy": 0.80}]}}
print("\\n".join(defaults.targets(runs, 0.805, 245)))
print("\\n".join(defaults.targets(runs, 0.90, 2000)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    small, medium = out.stdout.split("Targets (issue 13)")[1:]
    assert "3.00× (target ≥ 2×: met)" in small and "+19.0 points" in small
    assert "0.5 points below it (target ≤ 1: met)" in small
    assert "3.00× (target ≥ 3×: met)" in medium and "target ≥ +0: met" in medium
    assert "10.0 points below it (target ≤ 1: missed)" in medium


def test_defaults_time_to_accuracy_judges_the_first_budget_that_reaches_the_recipe():
    code = """
import defaults
def pair(r_s, r_a, t_s, t_a):
    return {"recipe": [{"seconds": r_s, "accuracy": r_a}],
            "tlkeras": [{"seconds": t_s, "accuracy": t_a}]}
runs = {"full": pair(80.0, 0.70, 60.0, 0.85), "feature_extraction": pair(30.0, 0.60, 25.0, 0.65)}
print(defaults.curve_report(runs, {1: pair(40.0, 0.62, 35.0, 0.72)}, 10))
print(defaults.curve_report(runs, {1: pair(40.0, 0.62, 45.0, 0.72)}, 10))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    met, missed = out.stdout.split("#### `full`: time to accuracy")[1:]
    # Budget 0 (feature_extraction, 65 %) is below the recipe's 70 %; budget 1 reaches it.
    assert "| 0 | 30.0 | 60.0 % | 25.0 | 65.0 % |" in met
    assert "first reaches it at budget 1 in 35.0 s, within half the recipe's 80.0 s (met)" in met
    assert "at budget 1 in 45.0 s, over half the recipe's 80.0 s (missed)" in missed


def test_recipe_verdicts_follow_the_gain_and_the_seed_spread():
    # benchmarks/recipe.py: a knob helps only beyond the spread of the seeds, on every data set.
    code = """
import recipe
def runs(base, rows):
    out = {"defaults": [{"accuracy": a, "seconds": 10.0} for a in base]}
    out.update({k: [{"accuracy": a, "seconds": 20.0} for a in v] for k, v in rows.items()})
    return out
small = runs([0.80, 0.82, 0.84], {"ema": [0.90, 0.92, 0.94], "cosine": [0.80, 0.83, 0.83],
                                  "mixup": [0.70, 0.71, 0.75]})
medium = runs([0.90, 0.90, 0.90], {"ema": [0.905, 0.905, 0.905], "cosine": [0.95, 0.96, 0.97],
                                   "mixup": [0.90, 0.90, 0.90]})
j = recipe.judge(small)
print(j["ema"]["verdict"], j["cosine"]["verdict"], j["mixup"]["verdict"], j["ema"]["time_ratio"])
print(recipe.verdict_report({"a": {"runs": small}, "b": {"runs": medium}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    first, *table = out.stdout.splitlines()
    assert first == "helps within the seed spread hurts 2.0"
    rows = {line.split(" | ")[0].strip("| "): line for line in table if line.startswith("| ")}
    # ema: +10 points with spread 2 on one set, +0.5 with spread 0 on the other: helps on both.
    assert rows["ema"].endswith("| yes |") and "+10.0 / 2.0 (helps)" in rows["ema"]
    assert rows["cosine"].endswith("| no |") and rows["mixup"].endswith("| no |")
