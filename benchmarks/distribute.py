"""Single device vs MirroredStrategy (2 logical CPUs) vs 2 workers on loopback, through
``scripts/train.py`` on the shared ants/bees photos: does distributed training land in the same
accuracy band, and what does it cost on one machine?

    python benchmarks/distribute.py            # 3 seeds, 160², 10 + 10 epochs (about 15 minutes)
    python benchmarks/distribute.py --quick    # 1 seed, 96², 3 + 2 epochs (about 2 minutes)

Each run is its own process (two for the multi-worker run, with their own TF_CONFIG), with the same
flags, split and seed. Writes the "Distributed training" section of BENCHMARKS.md (``run.py``
keeps it when it rewrites the rest).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import DEFAULT_DATA, DEFAULT_WEIGHTS, machine, write_section  # noqa: E402

from tlkeras.fitting.distribute import loopback_tf_configs  # noqa: E402

TRAIN = REPO / "scripts" / "train.py"
SECTION = "distribute"
CONFIGS = {
    "single device": {"flags": ["--distribution=default"], "workers": 1},
    "mirrored, 2 logical CPUs": {
        "flags": ["--distribution=mirrored", "--cpu_replicas=2"],
        "workers": 1,
    },
    "multi_worker, 2 workers": {"flags": ["--distribution=multi_worker"], "workers": 2},
}
FULL = {"seeds": 3, "image_size": 160, "epochs": 10, "fine_tune_epochs": 10}
QUICK = {"seeds": 1, "image_size": 96, "epochs": 3, "fine_tune_epochs": 2}

flags.DEFINE_boolean("quick", False, "1 seed, 96², 3 + 2 epochs.")
flags.DEFINE_string("data", str(DEFAULT_DATA), "Image folder (one subfolder per class).")
flags.DEFINE_string("weights", str(DEFAULT_WEIGHTS), "MobileNet(alpha=0.25) no-top weights.")
flags.DEFINE_string("strategy", "full", "tlkeras strategy of every run.")
flags.DEFINE_string("output", str(REPO / "BENCHMARKS.md"), "Markdown file; '' prints only.")
FLAGS = flags.FLAGS


def run_one(name: str, seed: int, preset: dict[str, Any], work: Path) -> dict[str, Any]:
    """One configuration and seed through scripts/train.py; its metrics.json and wall time."""
    config = CONFIGS[name]
    run_dir = work / f"{name.split(',')[0].replace(' ', '_')}_{seed}"
    cmd = [
        sys.executable,
        str(TRAIN),
        f"--data={FLAGS.data}",
        "--backbone=MobileNet",
        "--backbone_kwargs=alpha=0.25",
        f"--weights={FLAGS.weights}",
        f"--image_size={preset['image_size']}",
        f"--strategy={FLAGS.strategy}",
        f"--epochs={preset['epochs']}",
        f"--fine_tune_epochs={preset['fine_tune_epochs']}",
        f"--seed={seed}",
        f"--output_dir={run_dir}",
        f"--base_dir={work / 'saved_models'}",
        f"--model_name={run_dir.name}",
        *config["flags"],
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tf_configs = loopback_tf_configs(config["workers"]) if config["workers"] > 1 else [None]
    started = time.perf_counter()
    procs = []
    for tf_config in tf_configs:
        if tf_config is not None:
            env = {**env, "TF_CONFIG": tf_config}
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - started
    for p, (out, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{name} seed {seed} failed:\n{out[-2000:]}\n{err[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())["history"]
    val = [v for v in history.get("val_accuracy", []) if v is not None]
    best = int(np.argmin(history["val_loss"])) if history.get("val_loss") else None
    return {
        "accuracy": metrics["accuracy"],
        "val_accuracy": val[best] if best is not None else None,
        "phase_s": [p["wall_time_s"] for p in metrics["phases"]],
        "wall_s": wall,
        "distribution": metrics["run"].get("distribution"),
        "test_n": sum(metrics["counts"]["test"].values()),
    }


def _pm(values: list[float], fmt: str) -> str:
    mean, sd = float(np.mean(values)), float(np.std(values))
    return f"{fmt.format(mean)} ± {fmt.format(sd)}" if len(values) > 1 else fmt.format(mean)


def report(runs: dict[str, list[dict]], preset: dict[str, Any], seconds: float) -> str:
    info = machine()
    single = [r["accuracy"] for r in runs["single device"]]
    n = runs["single device"][0]["test_n"]
    p = float(np.mean(single))
    band = 2 * float(np.sqrt(p * (1 - p) / n))  # two binomial standard deviations
    rows = []
    verdicts = []
    for name, rs in runs.items():
        acc = [r["accuracy"] for r in rs]
        gap = float(np.mean(acc)) - p
        within = abs(gap) <= band
        if name != "single device":
            verdicts.append(within)
        rows.append(
            f"| {name} | {rs[0]['distribution']} | {_pm([a * 100 for a in acc], '{:.1f}')} % | "
            f"{_pm([r['val_accuracy'] * 100 for r in rs], '{:.1f}')} % | "
            f"{_pm([r['phase_s'][0] for r in rs], '{:.1f}')} | "
            f"{_pm([r['phase_s'][-1] for r in rs], '{:.1f}')} | "
            f"{_pm([r['wall_s'] for r in rs], '{:.0f}')} | "
            f"{'—' if name == 'single device' else f'{gap * 100:+.1f} pts'} |"
        )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/distribute.py" + (" --quick" if FLAGS.quick else "")
    verdict = "met" if all(verdicts) else "missed"
    return "\n".join(
        [
            "## Distributed training (tf.distribute)",
            "",
            f"Generated by `{command}` on {stamp} ({seconds / 60:.1f} minutes), "
            f"{info['cpu']}, {info['cores']} cores. Every run is `scripts/train.py` with the same "
            f"flags: MobileNet(alpha=0.25) ImageNet weights, {preset['image_size']}², "
            f"`--strategy={FLAGS.strategy}`, {preset['epochs']} + {preset['fine_tune_epochs']} "
            f"epochs, 32 images per replica, seeds {list(range(preset['seeds']))}; accuracy on "
            f"the {n} held-out test images of the shared ants/bees split. The distributed runs "
            "share the machine's 2 cores between their replicas or processes, so their times "
            "show the overhead of the machinery, not a speed-up. Phase 1 of the single-device "
            "run uses the fast frozen path, which is off under a strategy.",
            "",
            "| configuration | strategy | test accuracy | val accuracy (best epoch) | "
            "phase 1 s | phase 2 s | end to end s | vs single |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**Target: the same accuracy band as the single device — {verdict}.** Band: two "
            f"binomial standard deviations of the single-device accuracy on {n} images "
            f"(±{band * 100:.1f} points).",
        ]
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received {argv[1:]}")
    preset = QUICK if FLAGS.quick else FULL
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="tlkeras_dist_bench_") as tmp:
        for seed in range(preset["seeds"]):
            for name in CONFIGS:
                runs[name].append(run_one(name, seed, preset, Path(tmp)))
                r = runs[name][-1]
                print(f"{name} seed {seed}: test {r['accuracy']:.3f} in {r['wall_s']:.0f} s")
    text = report(runs, preset, time.perf_counter() - started)
    print(text)
    if FLAGS.output:
        write_section(FLAGS.output, SECTION, text)
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
    from tlkeras import cli

    cli.run(main)
