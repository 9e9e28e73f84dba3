"""Tests for scripts/train.py and scripts/evaluate.py: bad flags, one tiny end-to-end run."""

import json
import os
from pathlib import Path

import pytest
from conftest import (
    REPO,
    bad_input_cases,
    bad_input_env,
    check_bad_flags_fail_in_one_line,
    run_python,
)

TRAIN = REPO / "scripts" / "train.py"
EVALUATE = REPO / "scripts" / "evaluate.py"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_HOME": str(tmp_path / "keras_home")}
    env.pop("TF_CONFIG", None)  # a single-machine run, whatever the caller's environment
    return env


BAD_FLAGS = {
    # The library's messages name its arguments, which the flags share.
    "scratch_with_imagenet": (["--strategy=scratch", "--weights=imagenet"], "expects weights=None"),
    "fine_tune_at_without_partial": (["--strategy=full", "--fine_tune_at=3"], "fine_tune_at:"),
    "negative_epochs": (["--epochs=-1"], "epochs: expected an int >= 0, received -1"),
    "bad_class_weight": (["--class_weight=heavy"], "--class_weight"),
    "unknown_flag": (["--epoch=3"], "epoch"),
    "multi_worker_without_tf_config": (["--distribution=multi_worker"], "TF_CONFIG"),
    "cpu_replicas_without_mirrored": (["--cpu_replicas=2"], "cpu_replicas"),
    "tpu_without_a_tpu": (["--distribution=tpu", "--tpu=local"], "distribution='tpu'"),
    "unknown_export_format": (["--export_formats=saved_model,tflite_int4"], "export_formats:"),
    # The recipe's knobs (issue 15), one per path a bad value takes: an enum flag (absl), the parsed
    # learning rate (cli), TrainConfig's checks (each field's own message: tests/fitting/test_phase.py).
    "mixed_precision_float16": (["--mixed_precision=float16"], "mixed_precision"),
    "learning_rate_word": (["--learning_rate=fast"], "--learning_rate: expected auto or"),
    "more_stages_than_epochs": (
        ["--unfreeze_stages=4", "--fine_tune_epochs=3"],
        "TrainConfig.unfreeze_stages",
    ),
}


def test_bad_flags_exit_2_with_one_line_and_no_traceback(tmp_path):
    check_bad_flags_fail_in_one_line(
        TRAIN, BAD_FLAGS, _env(tmp_path), lambda name: [f"--output_dir={tmp_path / name}"]
    )


@pytest.mark.slow
def test_tiny_end_to_end_run_exports_and_never_overwrites(tmp_path):
    run, export = tmp_path / "run", tmp_path / "saved_models"
    cmd = [
        TRAIN,
        "--data=digits:0-2",
        "--weights=none",
        "--image_size=32",
        "--strategy=partial",
        "--fine_tune_at=-1",  # a short backward graph: quicker to trace
        "--epochs=1",
        "--fine_tune_epochs=1",
        f"--output_dir={run}",
        f"--base_dir={export}",
        "--model_name=tiny",
        "--export_formats=saved_model,tflite_int8",
        "--nobaselines",  # tests/workflows/test_transfer.py covers them
    ]
    out = run_python(*cmd, env=_env(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    version = export / "tiny" / "1"
    assert f"Exported SavedModel: {version}" in out.stdout
    assert (version / "saved_model.pb").is_file()
    # The int8 file of the same version: calibrated on training images, verified on the test split.
    tflite = export / "tiny" / "edge" / "1" / "tflite_int8"
    assert f"Exported tflite_int8: {tflite}" in out.stdout
    edge_meta = json.loads((tflite / "metadata.json").read_text())
    assert edge_meta["version"] == 1 and edge_meta["input"]["input_dtype"] == "uint8"
    assert edge_meta["calibration_images"] > 0 and "accuracy" in edge_meta["verification"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["edge_exports"]["tflite_int8"]["path"] == str(tflite / "model.tflite")
    assert metrics["export"] == str(version)
    # The default run writes its report, and the export carries the run's temperature.
    assert metrics["report"] == str(run / "report.html") and (run / "audit.json").is_file()
    exported = json.loads((version / "assets.extra" / "metadata.json").read_text())
    if metrics["calibration"]:
        assert exported["calibration"]["temperature"] == metrics["calibration"]["temperature"]
    assert metrics["class_names"] == ["0", "1", "2"]
    assert [p["phase"] for p in metrics["phases"]] == [1, 2]
    cm = metrics["confusion_matrix"]  # the reported accuracy is the test split's, recomputed
    assert metrics["accuracy"] == pytest.approx(
        sum(cm[i][i] for i in range(len(cm))) / sum(map(sum, cm))
    )

    # The same command again: the finished run is kept, one line, exit 2.
    again = run_python(*cmd, env=_env(tmp_path))
    assert (
        again.returncode == 2 and "finished run" in again.stderr and "--overwrite" in again.stderr
    )
    assert json.loads((run / "metrics.json").read_text()) == metrics

    # The exported model scores through scripts/evaluate.py with the same metrics layout.
    ev = run_python(
        EVALUATE,
        f"--model={version}",
        "--data=digits:0-2",
        f"--output_dir={tmp_path / 'eval'}",
        env=_env(tmp_path),
    )
    assert ev.returncode == 0, ev.stdout + ev.stderr
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["num_examples"] == sum(sum(c.values()) for c in metrics["counts"].values())
    assert set(scored["per_class"]) == set(metrics["per_class"])
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 0


def test_evaluate_missing_model_is_one_line(tmp_path):
    out = run_python(
        EVALUATE, f"--model={tmp_path / 'nope'}", "--data=digits", env=_env(tmp_path), timeout=120
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "--model" in out.stderr


def test_bad_weights_files_kwargs_and_max_bad_fraction_end_in_one_line(tmp_path):
    cases = bad_input_cases(tmp_path)
    cases["both_base_dir_spellings"] = (
        ["--export_dir=a", "--base_dir=b"],
        "--export_dir and --base_dir: expected one value",
    )

    def extra(name: str) -> list[str]:
        given = " ".join(cases[name][0])
        return [
            f"--output_dir={tmp_path / name}",
            *([] if "--data=" in given else ["--data=digits:0-2"]),
            *([] if "--base_dir=" in given else ["--base_dir="]),  # '': no export
        ]

    check_bad_flags_fail_in_one_line(TRAIN, cases, bad_input_env(tmp_path, _env(tmp_path)), extra)
