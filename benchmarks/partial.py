"""`partial` fine-tuning: phase 2 on the cached block boundary vs the same phase the plain way.

    python benchmarks/partial.py                 # ants/bees, 3 seeds, fine_tune_at=-5
    python benchmarks/partial.py --data=../shared/data/cats_dogs/train --seeds=1

The data is split once (``common.make_split``: train / validation for early stopping / held-out
test). For every seed two workers run back to back, each in its own fresh process, through the
library's one phase runner (``tlkeras.fitting.runner.run_phase``): the same head warm-up (phase 1, fast
path, the same seed), then phase 2 ``partial(fine_tune_at)`` at ``learning_rate / 10``:

- ``cached``: ``Phase(fast=True)``: the frozen prefix runs once, to the block boundary (clean and
  augmented views, as the head warm-up does), and only the trainable blocks run every epoch;
- ``plain``: ``Phase(fast=False)``: ``model.fit`` on the images, the frozen prefix recomputed for
  every batch of every epoch (what the Keras guide does).

Phase 2's wall time includes the feature caching. Accuracy is on the test split (never trained or
early-stopped on). Writes the ``partial`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import app, flags
from common import REPO, BenchConfig, machine, make_split, write_result, write_section

HERE = Path(__file__).resolve().parent
MODES = ("cached", "plain")
_B = BenchConfig()

flags.DEFINE_string("data", _B.data, "Folder with one subfolder per class.")
flags.DEFINE_string("weights", _B.weights, "MobileNet(alpha=0.25) no-top weights file.")
flags.DEFINE_integer("seeds", 3, "Training seeds 0..N-1.")
flags.DEFINE_integer("epochs", _B.epochs, "Head warm-up epochs (phase 1).")
flags.DEFINE_integer("fine_tune_epochs", _B.fine_tune_epochs, "Phase 2 epochs.")
flags.DEFINE_integer("fine_tune_at", -5, "partial: first trainable block (MobileNet has 14).")
flags.DEFINE_integer("image_size", _B.image_size, "Square image size.")
flags.DEFINE_string("output", str(REPO / "BENCHMARKS.md"), "Report to update; '' to skip.")
flags.DEFINE_enum("worker", None, MODES, "Internal: run one mode in this process.")
flags.DEFINE_string("job", None, "Internal: the worker's job file (JSON).")
FLAGS = flags.FLAGS


def _worker(mode: str, job_path: str) -> None:
    import keras

    from tlkeras.data import sources as data_lib
    from tlkeras.fitting.config import FEATURE_EXTRACTION, PARTIAL, Phase
    from tlkeras.fitting.runner import run_phase
    from tlkeras.models.builder import AugmentConfig, build_model
    from tlkeras.models.task import encode_labels

    job = json.loads(Path(job_path).read_text())
    config = BenchConfig.from_dict(job["config"])
    size = (config.image_size, config.image_size)
    data = data_lib.load(job["split_dir"], image_size=size, batch_size=config.batch_size)
    keras.utils.set_random_seed(job["seed"])
    model = build_model(
        "MobileNet",
        data.num_classes,
        weights=config.weights,
        input_shape=(*size, 3),
        backbone_kwargs={"alpha": config.alpha},
        augment=AugmentConfig(seed=job["seed"]),
    )
    n = data.num_classes
    train, val = (encode_labels(d, "multiclass", n) for d in (data.train, data.validation))

    def early() -> list:
        return [keras.callbacks.EarlyStopping(patience=config.patience, restore_best_weights=True)]

    warm = Phase("head warm-up", FEATURE_EXTRACTION, None, 1e-3, config.epochs, 1e-4, fast=True)
    head = run_phase(model, warm, train, val, callbacks=early(), seed=job["seed"])
    fine = Phase(
        "fine-tuning",
        PARTIAL,
        job["fine_tune_at"],
        1e-4,
        config.fine_tune_epochs,
        1e-4,
        fast=mode == "cached",
    )
    result = run_phase(
        model, fine, train, val, callbacks=early(), seed=job["seed"], initial_epoch=head.epochs_run
    )
    model.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    test = model.evaluate(encode_labels(data.test, "multiclass", n), verbose=0, return_dict=True)
    write_result(
        job["out"],
        {
            "mode": mode,
            "seed": job["seed"],
            "phase1_s": head.seconds,
            "phase2_s": result.seconds,
            "phase2_epochs": result.epochs_run,
            "phase2_fast_path": result.fast_path,
            "trainable_params": result.trainable_params,
            "accuracy": float(test["accuracy"]),
        },
    )


def _spawn(mode: str, job: dict[str, Any], work: Path) -> dict[str, Any]:
    job_path = work / f"{mode}_{job['seed']}.json"
    job = {**job, "out": str(work / f"{mode}_{job['seed']}_result.json")}
    job_path.write_text(json.dumps(job))
    cmd = [sys.executable, str(HERE / "partial.py"), f"--worker={mode}", f"--job={job_path}"]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(Path(job["out"]).read_text())


def _name(config: BenchConfig) -> str:
    path = Path(config.data)
    return path.parent.name if path.name == "train" else path.name


def _pm(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def report(
    runs: dict[str, list[dict]], counts: dict, config: BenchConfig, fine_tune_at: int
) -> str:
    ratios = [
        p["phase2_s"] / c["phase2_s"] for c, p in zip(runs["cached"], runs["plain"], strict=True)
    ]
    rows = []
    for mode in MODES:
        rs = runs[mode]
        rows.append(
            f"| {mode} | {rs[0]['phase2_fast_path'] or 'images (model.fit)'} | "
            f"{'/'.join(str(r['phase2_epochs']) for r in rs)} | "
            f"{_pm([r['phase2_s'] for r in rs], '{:.1f}')} | "
            f"{_pm([100 * r['accuracy'] for r in rs], '{:.1f}')} % |"
        )
    split = ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items())
    info = machine()
    return "\n".join(
        [
            f"## `partial` phase 2 on {_name(config)}: cached block boundary vs plain "
            "(`benchmarks/partial.py`)",
            "",
            f"`{_name(config)}` split once ({split}); MobileNet(alpha={config.alpha}), "
            f"{config.image_size}², shared ImageNet weights, head warm-up {config.epochs} epochs, "
            f"then `partial(fine_tune_at={fine_tune_at})` for up to {config.fine_tune_epochs} "
            f"epochs at 1e-4, EarlyStopping patience {config.patience}; seeds "
            f"0..{len(runs['cached']) - 1}, each mode in its own process, back to back. "
            f"Machine: {info.get('cpu')}, {info.get('cores')} cores, load average at the end "
            f"{info.get('load_average')}. Phase 2 wall time includes the feature caching.",
            "",
            "| phase 2 | trains on | epochs run | phase 2 wall s | test accuracy |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"plain ÷ cached, phase 2: {_pm(ratios, '{:.1f}')}× (per seed: "
            + ", ".join(f"{r:.1f}×" for r in ratios)
            + ").",
        ]
    )


def main(argv: list[str]) -> None:
    if FLAGS.worker:
        _worker(FLAGS.worker, FLAGS.job)
        return
    config = BenchConfig(
        data=FLAGS.data,
        weights=FLAGS.weights,
        image_size=FLAGS.image_size,
        epochs=FLAGS.epochs,
        fine_tune_epochs=FLAGS.fine_tune_epochs,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tlkeras_bench_partial_") as tmp:
        work = Path(tmp)
        counts = make_split(config, work / "split")
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for seed in range(FLAGS.seeds):
            job = {
                "config": config.to_dict(),
                "split_dir": str(work / "split"),
                "seed": seed,
                "fine_tune_at": FLAGS.fine_tune_at,
            }
            for mode in MODES:
                runs[mode].append(_spawn(mode, job, work))
                print(json.dumps(runs[mode][-1]), flush=True)
    text = report(runs, counts, config, FLAGS.fine_tune_at)
    print(text)
    print(f"({time.perf_counter() - started:.0f} s)")
    if FLAGS.output:
        write_section(FLAGS.output, f"partial_{_name(config)}", text)


if __name__ == "__main__":
    app.run(main)
