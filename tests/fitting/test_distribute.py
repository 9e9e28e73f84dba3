"""Tests for tlkeras.fitting.distribute and distributed training: settings, mirrored on two logical CPUs,
two workers on loopback ports (weights agree, only the chief exports) and a worker restart that
resumes from the chief's backup. Each run is its own process (strategies fix TF's devices)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import HYMENOPTERA, MOBILENET_WEIGHTS, needs_hymenoptera, needs_shared_weights

from tlkeras import cli
from tlkeras.fitting import distribute
from tlkeras.fitting.distribute import DistributeConfig, Distribution

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "scripts" / "train.py"
RUNNER = REPO / "tests" / "distributed_run.py"

# One small real-weights recipe for every run, so the accuracies are comparable.
RECIPE = {
    "data_source": str(HYMENOPTERA),
    "backbone": "MobileNet",
    "backbone_kwargs": {"alpha": 0.25},
    "weights": str(MOBILENET_WEIGHTS),
    "image_size": 64,
    "strategy": "full",
    "epochs": 3,
    "fine_tune_epochs": 2,
    # The same training everywhere: under tf.distribute the fast path, and with it the solved
    # head, is off, so the single-device reference trains its head by gradient epochs too.
    "head_solver": "gradient",
    # A constant rate: with 3 steps an epoch under a global batch of 64, the default cosine's
    # warm-up epoch is a third of the budget, and the runs would differ by their step counts.
    "schedule": "constant",
}
ACCURACY_BAND = 0.15  # about two binomial standard deviations on the 49 test images


# --------------------------------------------------------------------------------------------------
# Settings and helpers (in process)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Distribution))
def test_distribution_parses_every_name(kind):
    assert Distribution.parse(kind.value.upper()) is kind
    assert DistributeConfig(kind.value).distribution is kind


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"distribution": "horovod"}, "expected one of"),
        ({"distribution": "default", "cpu_replicas": 2}, "only with distribution='mirrored'"),
        ({"distribution": "mirrored", "cpu_replicas": 0}, "expected an int >= 1"),
        ({"distribution": "mirrored", "cpu_replicas": True}, "expected an int >= 1"),
        ({"distribution": "mirrored", "tpu": "local"}, "only with distribution='tpu'"),
    ],
)
def test_config_rejects_bad_settings(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        DistributeConfig(**kwargs)


@pytest.mark.parametrize(
    "tf_config, expected",
    [
        (None, "expected the TF_CONFIG environment variable"),
        ("{not json", "TF_CONFIG: expected JSON"),
        ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG: expected JSON"),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
            "task.index",
        ),
    ],
)
def test_multi_worker_needs_a_usable_tf_config(monkeypatch, tf_config, expected):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=expected):
        distribute.make_strategy("multi_worker")


def test_read_tf_config_returns_the_cluster(monkeypatch):
    config = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert distribute.read_tf_config() == config


def test_loopback_tf_configs_describe_one_cluster_of_distinct_local_ports():
    configs = [json.loads(c) for c in distribute.loopback_tf_configs(3)]
    hosts = configs[0]["cluster"]["worker"]
    assert len(set(hosts)) == 3 and all(h.startswith("localhost:") for h in hosts)
    assert all(c["cluster"] == {"worker": hosts} for c in configs)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]


@pytest.mark.parametrize(
    "task_type, task_id, cluster, chief",
    [
        (None, 0, {}, True),
        ("worker", 0, {"worker": ["a", "b"]}, True),
        ("worker", 1, {"worker": ["a", "b"]}, False),
        ("chief", 0, {"chief": ["c"], "worker": ["a"]}, True),
        ("worker", 0, {"chief": ["c"], "worker": ["a"]}, False),
        ("evaluator", 0, {"worker": ["a", "b"], "evaluator": ["e"]}, False),
    ],
)
def test_chief_rule(task_type, task_id, cluster, chief):
    assert distribute.chief_of(task_type, task_id, cluster) is chief


def test_default_strategy_is_one_chief_device_and_every_helper_is_a_no_op():
    strategy = distribute.make_strategy(None)
    assert strategy is tf.distribute.get_strategy()
    assert not distribute.is_distributed(strategy) and not distribute.is_multi_worker(strategy)
    assert distribute.is_chief(strategy) and distribute.worker_id(strategy) == (None, 0)
    assert distribute.global_batch_size(32, strategy) == 32
    assert distribute.describe(strategy) == "default (one device)"
    dataset = tf.data.Dataset.range(3)
    assert distribute.shard_by_data(dataset, strategy) is dataset
    distribute.barrier(strategy)
    from keras.src.backend.tensorflow import trainer

    before = trainer.reduce_per_replica
    with distribute.keras_fixes(strategy):
        assert trainer.reduce_per_replica is before


def test_a_collective_failure_outside_multi_worker_is_not_renamed(tmp_path):
    strategy = tf.distribute.get_strategy()
    with pytest.raises(tf.errors.UnavailableError):
        with distribute.lost_worker_as_error(strategy, tmp_path):
            raise tf.errors.UnavailableError(None, None, "peer gone")


def test_a_lost_worker_ends_the_script_with_one_line_and_the_retry_code(monkeypatch, capsys):
    def main(argv):
        raise distribute.WorkerLost("a worker was lost during training; run it again")

    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main)
    assert exit_info.value.code == distribute.EXIT_RETRY
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: error: a worker was lost during training; run it again"]


# --------------------------------------------------------------------------------------------------
# Real runs (subprocesses)
# --------------------------------------------------------------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    tmp = tmp_path / "tmp"  # worker copies of the run directory land here: checked to be removed
    tmp.mkdir(exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "KERAS_HOME": str(tmp_path / "keras_home"),
        "TMPDIR": str(tmp),
        **extra,
    }


def _runner(tmp_path: Path, name: str, distribution: str, **extra) -> tuple[list[str], Path]:
    reports = tmp_path / "reports"
    kwargs = {
        **RECIPE,
        "output_dir": str(tmp_path / "run"),
        "export_dir": str(tmp_path / "saved_models"),
        "model_name": name,
        **extra,
    }
    return [sys.executable, str(RUNNER), str(reports), distribution, json.dumps(kwargs)], reports


def _check_logged_metrics(report: dict) -> None:
    """The validation metrics Keras logged for the best epoch are the final model's own."""
    history = report["history"]
    best = int(np.argmin(history["val_loss"]))
    assert history["val_loss"][best] == pytest.approx(report["val_loss"], abs=1e-4)
    assert history["val_accuracy"][best] == pytest.approx(report["val_accuracy"], abs=1e-6)


@pytest.fixture(scope="module")
def single_device_accuracy(tmp_path_factory) -> float:
    tmp_path = tmp_path_factory.mktemp("single")
    cmd, reports = _runner(tmp_path, "single", "default")
    out = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((reports / "local.json").read_text())
    _check_logged_metrics(report)
    return report["metrics"]["accuracy"]


@needs_shared_weights
@needs_hymenoptera
@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_trains_logs_true_metrics_and_exports(
    tmp_path, single_device_accuracy
):
    cmd, reports = _runner(tmp_path, "mirrored", "mirrored", cpu_replicas=2)
    out = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "global batch 64 (32 per replica)" in out.stdout
    assert "fast path: no — off under tf.distribute" in out.stdout
    report = json.loads((reports / "local.json").read_text())
    assert report["replicas"] == 2 and report["chief"]
    _check_logged_metrics(report)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run"]["distribution"].startswith("MirroredStrategy, 2 replica(s)")
    assert (tmp_path / "saved_models" / "mirrored" / "1" / "saved_model.pb").is_file()
    assert abs(metrics["accuracy"] - single_device_accuracy) <= ACCURACY_BAND


def _start_workers(tmp_path: Path, cmd: list[str], workers: int = 2) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            cmd,
            env=_env(tmp_path, TF_CONFIG=tf_config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tf_config in distribute.loopback_tf_configs(workers)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


@needs_shared_weights
@needs_hymenoptera
@pytest.mark.slow
def test_two_workers_on_loopback_agree_and_only_the_chief_exports(tmp_path, single_device_accuracy):
    cmd, reports = _runner(tmp_path, "two_workers", "multi_worker")
    results = _finish(_start_workers(tmp_path, cmd))
    for rc, out, err in results:
        assert rc == 0, out[-3000:] + err[-3000:]
    chief, other = (json.loads((reports / f"worker{i}.json").read_text()) for i in (0, 1))
    assert chief["chief"] and not other["chief"]
    assert chief["replicas"] == other["replicas"] == 2
    w0, w1 = (np.load(reports / f"worker{i}.npz") for i in (0, 1))
    assert w0.files == w1.files
    assert max(float(np.abs(w0[k] - w1[k]).max()) for k in w0.files) == 0.0
    _check_logged_metrics(chief)
    assert chief["history"] == other["history"]  # both workers logged the same global metrics

    versions = list((tmp_path / "saved_models" / "two_workers").iterdir())
    assert [v.name for v in versions] == ["1"]
    assert "Exported SavedModel" in results[0][1] and "Exported SavedModel" not in results[1][1]
    assert other["metrics"] == {"chief": False}
    assert not any((tmp_path / "tmp").iterdir())  # the worker's private copy is gone
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "worker 0 (chief)" in metrics["run"]["distribution"]
    assert abs(metrics["accuracy"] - single_device_accuracy) <= ACCURACY_BAND


@needs_shared_weights
@needs_hymenoptera
@pytest.mark.slow
def test_a_killed_worker_is_reported_and_the_restarted_workers_resume(tmp_path):
    run, export = tmp_path / "run", tmp_path / "saved_models"
    flags = [
        f"--data={HYMENOPTERA}",
        "--backbone=MobileNet",
        "--backbone_kwargs=alpha=0.25",
        f"--weights={MOBILENET_WEIGHTS}",
        "--image_size=64",
        "--strategy=full",
        "--epochs=3",
        "--fine_tune_epochs=1",
        "--distribution=multi_worker",
        "--noreport",
        f"--output_dir={run}",
        f"--base_dir={export}",
        "--model_name=restart",
    ]
    cmd = [sys.executable, str(TRAIN), *flags]
    procs = _start_workers(tmp_path, cmd)
    backup = run / "backup" / "phase1" / "training_metadata.json"
    deadline = time.monotonic() + 300
    while not backup.exists():  # the chief backed up an epoch: kill worker 1 mid-run
        assert time.monotonic() < deadline and procs[0].poll() is None, _finish(procs, 10)
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    rc, out, err = _finish(procs[:1], timeout=300)[0]
    procs[1].wait()
    assert rc == distribute.EXIT_RETRY, out[-3000:] + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: a worker was lost during training"), err[-3000:]
    assert str(run) in last and "Traceback" not in err
    assert not export.exists() or not any(export.rglob("saved_model.pb"))

    # A cluster manager restarts the workers with the same command: both resume and finish.
    results = _finish(_start_workers(tmp_path, cmd))
    for rc, out, err in results:
        assert rc == 0, out[-3000:] + err[-3000:]
        assert "Epoch 1/3" not in out  # neither worker repeats the backed-up epoch
    assert "Resuming the unfinished run" in results[0][1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["resumes"] == 1
    resumed_at = metrics["phases"][0]["resumed_at_epoch"]
    assert resumed_at is not None and resumed_at >= 1
    assert [v.name for v in (export / "restart").iterdir()] == ["1"]
