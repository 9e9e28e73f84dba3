"""Tests for tlkeras.workflows.training: config, losses, phase switch, NaN, resume after SIGKILL, run dirs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import MOBILENET_WEIGHTS, needs_shared_weights

import tlkeras
from tlkeras import data as data_lib
from tlkeras.exports import verify
from tlkeras.fitting import rundir
from tlkeras.fitting.config import resolve_class_weight
from tlkeras.workflows import report, training
from tlkeras.workflows.training import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SMALL = {"weights": None, "input_shape": (32, 32, 3), "backbone_kwargs": {"alpha": 0.25}}


@pytest.fixture(scope="module")
def digits():
    return data_lib.load("digits:0-2", image_size=(32, 32), batch_size=32, seed=0)


# ---------------------------------------------------------------------------------------------
# Losses, metrics, labels per head task


def test_class_weight_auto_is_balanced_from_train_counts():
    x = np.random.default_rng(0).integers(0, 255, (80, 32, 32, 3)).astype("uint8")
    y = np.array([0] * 60 + [1] * 20)
    data = data_lib.load((x, y), image_size=(32, 32), seed=0)
    weights = resolve_class_weight(TrainConfig(class_weight="auto"), data, "multiclass")
    n = data.counts["train"]
    total = sum(n.values())
    for i, name in enumerate(data.class_names):
        assert weights[i] == pytest.approx(total / (2 * n[name]))
    assert weights[1] > weights[0]
    assert resolve_class_weight(TrainConfig(), data, "multiclass") is None
    with pytest.raises(ValueError, match="class indices"):
        resolve_class_weight(TrainConfig(class_weight={5: 1.0}), data, "multiclass")


# ---------------------------------------------------------------------------------------------
# Two phases


@pytest.mark.slow
def test_phase_switch_flags_learning_rate_and_reports(digits, tmp_path):
    model = tlkeras.build_model("MobileNet", 3, strategy="partial", fine_tune_at=-2, **SMALL)
    config = TrainConfig(epochs=1, fine_tune_epochs=1, learning_rate=2e-3, fast=False)
    result = training.fit(model, digits, config, run_dir=tmp_path / "run", verbose=0, report=False)

    # Phase 2 recompiled the model with the reduced learning rate.
    assert float(model.optimizer.learning_rate) == pytest.approx(2e-4)
    h = result.history
    assert h["phase"] == [1, 2] and h["epoch"] == [0, 1] and h["phase_boundary"] == 1
    assert h["learning_rate"] == pytest.approx([2e-3, 2e-4])
    # Trainable flags per block: the last two blocks train, the others stay frozen.
    flags = [b.trainable for b in tlkeras.blocks(model)]
    assert flags[-2:] == [True, True] and not any(flags[:-2])
    p1, p2 = result.metrics["phases"]
    head_params = sum(int(np.prod(w.shape)) for w in model.get_layer("predictions").weights)
    assert p1["trainable_params"] == head_params
    assert p2["trainable_params"] > head_params
    assert (p1["strategy"], p2["strategy"], p2["fine_tune_at"]) == (
        "feature_extraction",
        "partial",
        -2,
    )

    run = result.run_dir
    for name in ("metrics.json", "history.json", "history.csv", "history.png", "confusion.png"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "model.keras").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test"
    assert metrics["num_examples"] == sum(digits.counts["test"].values())
    assert set(metrics["per_class"]) == {"0", "1", "2"}
    assert set(metrics["wall_time_s"]) == {"1", "2"} and metrics["counts"] == digits.counts
    assert json.loads((run / "run_state.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_partial_fine_tuning_trains_on_the_cached_block_boundary(digits, tmp_path):
    model = tlkeras.build_model("MobileNet", 3, strategy="partial", fine_tune_at=-2, **SMALL)
    config = TrainConfig(
        epochs=2,
        fine_tune_epochs=2,
        early_stopping_patience=0,
        converge_head=False,
        head_solver="gradient",  # exactly 2 + 2 epochs
        schedule="constant",
    )
    frozen = tlkeras.blocks(model)[:-2]
    before = [np.array(w) for b in frozen for w in b.trainable_weights + b.non_trainable_weights]
    result = training.fit(model, digits, config, run_dir=tmp_path / "run", verbose=0, report=False)
    p1, p2 = result.metrics["phases"]
    assert p1["fast_path"] == "cached" and p2["fast_path"] == "cached"
    assert p2["trainable_params"] > p1["trainable_params"]
    # The epochs continue across phases, as on the plain path.
    h = result.history
    assert h["epoch"] == [0, 1, 2, 3] and h["phase"] == [1, 1, 2, 2] and h["phase_boundary"] == 2
    assert h["learning_rate"] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    after = [np.array(w) for b in frozen for w in b.trainable_weights + b.non_trainable_weights]
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))


@pytest.mark.slow
def test_a_run_whose_fine_tuning_only_loses_says_so(digits, tmp_path, capsys):
    # A learning rate of 1 wrecks the backbone in one epoch (finite: MobileNet's ReLU6 bounds it).
    model = tlkeras.build_model("MobileNet", 3, strategy="full", **SMALL)
    config = TrainConfig(epochs=1, fine_tune_epochs=2, fine_tune_learning_rate=1.0)
    result = training.fit(model, digits, config, run_dir=tmp_path / "run", verbose=1, report=False)
    kept = result.metrics["kept"]
    assert (kept["phase"], kept["name"], kept["epoch"], kept["monitor"]) == (
        1,
        "head warm-up",
        1,
        "val_loss",
    )
    losses = result.history["val_loss"]
    assert kept["value"] == pytest.approx(losses[0]) and min(losses[1:]) > losses[0]
    assert "fine-tuning did not improve val_loss" in kept["note"]
    assert "keeps phase 1's weights" in kept["note"]
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["kept"] == kept
    out = capsys.readouterr().out
    assert "Kept: phase 1 (head warm-up), epoch 1" in out and "did not improve" in out


def test_fine_tune_at_without_partial_is_refused(digits, tmp_path):
    with pytest.raises(ValueError, match="fine_tune_at"):
        training.fit(
            tlkeras.build_model("MobileNet", 3, **SMALL), digits, run_dir=tmp_path, fine_tune_at=2
        )


def test_nan_loss_raises_a_clear_error_and_frees_the_run_dir(digits, tmp_path):
    model = tlkeras.build_model("MobileNet", 3, **SMALL)
    # Gradient epochs: a solved head has no learning rate to diverge with.
    config = TrainConfig(epochs=2, fine_tune_epochs=0, learning_rate=1e30, head_solver="gradient")
    with pytest.raises(ValueError, match=r"loss became NaN at epoch 1 .*learning_rate=1e\+30"):
        training.fit(model, digits, config, run_dir=tmp_path, verbose=0, report=False)
    assert json.loads((tmp_path / "run_state.json").read_text())["status"] == "failed"
    # A failed run is no finished run: the same directory can be reused with a fixed setting.
    state = rundir.prepare_run_dir(tmp_path, {"other": 1})
    assert state["resumes"] == 0 and not (tmp_path / "history_phase1.csv").exists()


# ---------------------------------------------------------------------------------------------
# Run directories: never overwritten, never mixed


# ---------------------------------------------------------------------------------------------
# Resume after SIGKILL (a real process), with a corrupted latest backup

RESUME_SCRIPT = """
import sys
import tlkeras
from tlkeras.data import sources as data
from tlkeras.workflows import training
d = data.load("digits:0-2", image_size=(32, 32), batch_size=64, seed=0)
m = tlkeras.build_model("MobileNet", 3, strategy="partial", fine_tune_at=-2, weights=None,
                        input_shape=(32, 32, 3), backbone_kwargs={"alpha": 0.25})
c = training.TrainConfig(epochs=2, fine_tune_epochs=EPOCHS2, early_stopping_patience=0,
                        converge_head=False, head_solver="gradient", unfreeze_stages=2)
r = training.fit(m, d, c, run_dir=sys.argv[1], verbose=0, report=False)
print("FINISHED", r.metrics["accuracy"])
"""


def _backup_epoch(path: Path) -> int:
    try:
        return json.loads(path.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
def test_sigkill_mid_stage_of_gradual_unfreezing_resumes_in_that_stage(tmp_path):
    # Gradual unfreezing (unfreeze_stages=2): phase 2 trains the last block, phase 3 the last two;
    # each stage is a phase of the run directory, so a kill mid-stage resumes in that stage.
    stage = 6
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT).replace("EPOCHS2", str(2 * stage)))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_HOME": str(tmp_path / "kh")}
    cmd = [sys.executable, str(script), str(run)]
    meta = run / "backup" / "phase3" / "training_metadata.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    first = 2 + stage  # phase 3's first epoch
    # Kill once phase 3 has backed up two epochs: a latest and a previous.
    while _backup_epoch(meta) < first + 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run ended before it could be killed:\n" + proc.stdout.read().decode()
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _backup_epoch(meta)
    # The epoch of the previous backup, where the resume must fall back to (a kill between
    # Keras's writes of the latest weights and of their metadata leaves it at killed_at, not - 1).
    previous = _backup_epoch(meta.with_name(meta.name + ".bkp"))
    assert killed_at < first + stage and first <= previous <= killed_at
    state = json.loads((run / "run_state.json").read_text())
    assert state["status"] == "running" and state["phases"]["2"]["done"]
    assert "3" not in state["phases"] or not state["phases"]["3"].get("done")
    # Corrupt the latest backup: the resume must fall back to the previous epoch's.
    (run / "backup" / "phase3" / "latest.weights.h5").write_bytes(b"not hdf5")

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FINISHED" in out.stdout and "Resuming" in out.stdout
    state = json.loads((run / "run_state.json").read_text())
    assert state["status"] == "done" and state["resumes"] == 1
    phases = state["phases"]
    assert [phases[k]["name"] for k in "123"] == [
        "head warm-up",
        "fine-tuning 1/2",
        "fine-tuning 2/2",
    ]
    # Top-down: the first stage trains fewer blocks than the last, which is the strategy's own.
    assert phases["2"]["trainable_params"] < phases["3"]["trainable_params"]
    assert phases["3"]["fine_tune_at"] == state["fingerprint"]["fine_tune_at"]
    assert phases["3"]["resumed_at_epoch"] == previous
    history = json.loads((run / "history.json").read_text())
    assert history["history"]["epoch"] == list(range(2 + 2 * stage))
    assert history["history"]["phase"] == [1, 1] + [2] * stage + [3] * stage


@pytest.mark.parametrize(
    "config, weights, overrides, expected",
    [
        # ImageNet/file/no weights: TrainConfig's defaults; None overrides mean "the default".
        (None, "imagenet", {"fine_tune_epochs": None}, {"fine_tune_epochs": 10}),
        (None, None, {"epochs": 3}, {"epochs": 3, "reduce_lr_on_plateau": False}),
        # source: weights fill in SOURCE_FINE_TUNING where the overrides say nothing.
        (None, "source:digits:0-4", {}, training.SOURCE_FINE_TUNING),
        (
            None,
            "source:digits:0-4",
            {"fine_tune_epochs": 4, "reduce_lr_on_plateau": None},
            {"fine_tune_epochs": 4, "reduce_lr_on_plateau": True},
        ),
        # An explicit config is taken as it is.
        (TrainConfig(epochs=2), "source:digits:0-4", {}, {"epochs": 2, "fine_tune_epochs": 10}),
    ],
)
def test_resolve_config(config, weights, overrides, expected):
    resolved = training.resolve_config(config, weights, **overrides)
    assert {k: getattr(resolved, k) for k in expected} == dict(expected)


def test_resolve_augment_digits_get_shifts_and_turns_without_flips():
    augment = training.resolve_augment(None, "digits:5-9", seed=4)
    assert augment.flip == "none" and augment.translation > 0 and augment.seed == 4
    assert training.resolve_augment(None, "some/folder").flip != "none"
    assert training.resolve_augment(False, "digits:5-9") is None


def test_resolve_augment_thumbnails_get_flips_only(tmp_path):
    from PIL import Image

    for side, folder in ((32, "thumbs"), (160, "photos")):
        for label in ("a", "b"):
            (tmp_path / folder / label).mkdir(parents=True)
            Image.new("RGB", (side, side)).save(tmp_path / folder / label / "0.png")
    thumbs = training.resolve_augment(None, str(tmp_path / "thumbs"), seed=2)
    assert thumbs == tlkeras.AugmentConfig(
        flip="horizontal", rotation=0.0, zoom=0.0, contrast=0.0, seed=2
    )
    photos = training.resolve_augment(None, str(tmp_path / "photos"), seed=2)
    assert photos == tlkeras.AugmentConfig(seed=2)  # the light default
    assert training.resolve_augment(True, str(tmp_path / "thumbs")) == tlkeras.AugmentConfig(seed=0)


# ---------------------------------------------------------------------------------------------
# report.html: every run writes one (tlkeras.workflows.report_html)


def _head_data(task: str, folder: Path) -> data_lib.ImageData:
    """60 tiny images whose colour channels carry the labels (learnable in one epoch); the
    single-label ones as a folder of PNGs, so the run records where its data came from."""
    from PIL import Image

    rng = np.random.default_rng(0)
    n = 60
    if task == "multilabel":
        y = rng.integers(0, 2, (n, 3)).astype("float32")
        y[y.sum(axis=1) == 0, 0] = 1
        colour = y * 200
    else:
        y = np.arange(n) % (3 if task == "multiclass" else 2)
        colour = np.eye(3)[y] * 200
    x = (rng.integers(0, 55, (n, 32, 32, 3)) + colour[:, None, None, :]).astype("uint8")
    if task == "multilabel":
        return data_lib.load((x, y), image_size=(32, 32), seed=0)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"c{label}" / f"{i}.png")
    return data_lib.load(folder, image_size=(32, 32), seed=0)


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
@pytest.mark.slow
def test_every_run_writes_a_report_with_every_section(task, tmp_path):
    from test_report_html import CHROMIUM, REQUIRE_BROWSER, Page, open_in_browser

    from tlkeras.models.builder import AugmentConfig, HeadConfig
    from tlkeras.workflows import report_content, report_html

    data = _head_data(task, tmp_path / "photos")
    units = {"multiclass": 3, "binary": 2, "multilabel": 3}[task]
    model = tlkeras.build_model(
        "MobileNet",
        units,
        strategy="feature_extraction",
        head=HeadConfig(task=task),
        augment=AugmentConfig(rotation=0, zoom=0, contrast=0),  # flips: TTA is measured
        **SMALL,
    )
    run_dir = tmp_path / "run"
    result = training.fit(
        model, data, TrainConfig(epochs=2, fast=False), run_dir=run_dir, verbose=0
    )
    page = Page((run_dir / report_html.REPORT_HTML).read_text(encoding="utf-8"))
    assert list(page.sections) == [sid for sid, _ in report_html.SECTIONS]
    n_test = sum(data.counts["test"].values()) if task != "multilabel" else len(data.items["test"])
    assert page.sections["top-losses"].count("loss ") == min(report_content.GALLERY_SIZE, n_test)
    assert "Test accuracy" in page.sections["tta"] or "test accuracy" in page.sections["tta"]
    audit = json.loads((run_dir / report_content.AUDIT_JSON).read_text())
    assert set(result.metrics["audit"]) == {
        "leak_count",
        "duplicate_count",
        "mislabel_count",
        "sampled",
    }
    assert audit["splits"] == {s: len(v) for s, v in data.items.items() if v}
    assert result.metrics["report"] == str(run_dir / report_html.REPORT_HTML)
    cal = result.metrics["calibration"]
    assert cal is None and result.metrics["calibration_note"] or cal["temperature"] > 0
    if task == "multilabel":
        with pytest.raises(ValueError, match="in-memory arrays"):
            report.report_run(run_dir)
    if task != "multiclass":
        return
    # The real page in a real browser: loads without console errors, every image decodes.
    if CHROMIUM or REQUIRE_BROWSER:
        dom, log = open_in_browser(run_dir / report_html.REPORT_HTML)
        assert 'data-broken="0"' in dom and "CONSOLE" not in log, log
    # scripts/report.py rebuilds it from the run directory alone (the data loaded again).
    (run_dir / report_html.REPORT_HTML).unlink()
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), f"--run_dir={run_dir}", "--noaudit"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (
        Page((run_dir / report_html.REPORT_HTML).read_text()).sections.keys()
        == page.sections.keys()
    )


@needs_shared_weights
def test_the_recipe_knobs_train_and_export_a_float32_in_model(tmp_path):
    # Issue 15 end to end, in one run: mixed_bfloat16, learning_rate=auto, cosine with warm-up,
    # per-block rates, EMA and mixup all train; the export takes float32 pixels and serves what
    # the in-memory (EMA) model computes, to bfloat16's precision.
    result = training.train(
        "digits:0-2",
        backbone="MobileNet",
        backbone_kwargs={"alpha": 0.25},
        weights=str(MOBILENET_WEIGHTS),
        image_size=32,
        strategy="full",
        augment=training.resolve_augment(None, "digits:0-2", 0, preset="mixup"),
        output_dir=tmp_path / "run",
        export_dir=tmp_path / "saved_models",
        model_name="m",
        report=False,
        verbose=0,
        mixed_precision="mixed_bfloat16",
        learning_rate="auto",
        epochs=2,
        fine_tune_epochs=3,
        schedule="cosine",
        warmup_epochs=1,
        layer_decay=0.8,
        ema=True,
        ema_momentum=0.9,
        early_stopping_patience=0,
    )
    metrics = result.metrics
    finder = metrics["learning_rate_finder"]
    assert 0 < finder["suggestion"] < 1 and (result.run_dir / training.LR_FIND_PNG).is_file()
    head, tune = metrics["phases"]
    assert head["learning_rate"] == pytest.approx(finder["suggestion"])
    assert tune["learning_rate"] == pytest.approx(finder["suggestion"] / 10)
    assert (tune["ema"], tune["layer_decay"], tune["schedule"]) == (True, 0.8, "cosine")
    assert tlkeras.get_spec(result.model).dtype_policy == "mixed_bfloat16"
    loaded = tf.saved_model.load(str(tmp_path / "saved_models" / "m" / "1"))
    serve = loaded.signatures["serving_float"]
    assert serve.structured_input_signature[1]["images"].dtype == tf.float32
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    served = serve(images=tf.constant(x))["probabilities"].numpy()
    expected = np.asarray(result.model(x, training=False))
    np.testing.assert_allclose(served, expected, atol=verify.MIXED_TOLERANCE["mixed_bfloat16"])
    assert served.dtype == np.float32


def test_a_run_records_its_steps_and_its_audit_reuses_the_runs_own_features(tmp_path):
    import keras

    from tlkeras.analysis import audit
    from tlkeras.fitting import fast_path
    from tlkeras.models.builder import AugmentConfig

    data = _head_data("multiclass", tmp_path / "photos")
    model = tlkeras.build_model(
        "MobileNet",
        3,
        strategy="feature_extraction",
        augment=AugmentConfig(rotation=0, zoom=0, contrast=0),
        **SMALL,
    )
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    result = training.fit(model, data, TrainConfig(epochs=2), run_dir=run_dir, verbose=0)
    wall = time.perf_counter() - started
    timings = result.metrics["timings"]
    steps = [t["step"] for t in timings]
    assert steps[:2] == ["cache_features", "solve_head"] and len(steps) == len(set(steps))
    assert {"evaluate", "calibration", "audit", "report"} <= set(steps)
    assert all(t["seconds"] >= 0 and t["peak_rss_mib"] > 0 for t in timings)
    assert sum(t["seconds"] for t in timings) <= wall  # nested steps are not counted twice
    assert len(result.metrics["phases"][0]["epoch_seconds"]) == 1  # the solved head: one "epoch"
    # The audit read the features the run computed (the fast path's cache for train, the
    # evaluation's for validation and test): what embedding every split afresh gives.
    embed = keras.Model(model.inputs, model.get_layer("pool").output)
    cached, labels = fast_path.pooled_features(model)
    fresh = np.concatenate([embed(x, training=False) for x, _ in data.ordered("train")])
    np.testing.assert_allclose(cached, fresh, rtol=1e-4, atol=1e-6)
    assert labels.argmax(1).tolist() == [int(i.split(os.sep)[0][1:]) for i in data.items["train"]]
    written = json.loads((run_dir / "audit.json").read_text())
    again = audit.audit(data, embed).to_dict()
    for key in ("splits", "leak_count", "duplicate_count", "mislabel_count", "sampled"):
        assert written[key] == again[key], key
