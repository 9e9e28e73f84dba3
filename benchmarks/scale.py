"""The cost curve of a real-size folder: each step of ``scripts/train.py`` from 1,000 to 50,000 files.

    python benchmarks/scale.py                                              # 1k, 10k, 50k files
    python benchmarks/scale.py --sizes=200,400 --recipe_frozen_at=400 --output=''   # smoke test
    python benchmarks/scale.py --from_results=/tmp/x/results.json           # tables again, no runs

Data (in a temporary folder under ``--work_dir``, removed at the end unless ``--keep``): the 10,000
CIFAR-10 images (32x32 JPEGs) are split by source image first (``common.make_holdout``: stratified,
split seed 0, 20 %): 2,000 real images are the held-out test part, never copied into a training
folder; the other 8,000 are the pool. The folder for N holds N class-balanced files made from the
pool: its originals (a seeded stratified subset below 8,000), then distinct variants of pool images
(horizontal flip, a 26-30 px crop resized back, JPEG re-encoding at quality 60-95, and their
combinations; one seeded sequence per class, so a smaller folder's variants are a prefix of a larger
one's). The cost curve is about files and bytes, not new labels.

For each N, back to back, each its own fresh process timed from interpreter start to exit, with its
own peak resident memory (``os.wait4``'s ``ru_maxrss``: the process or any one process it waited
for, such as the fresh-process export check):

- ``scripts/train.py --strategy=feature_extraction`` and ``--strategy=full --fine_tune_epochs=1``
  with their defaults otherwise (report and audit on, ``--image_size=auto``, ``--weights=imagenet``
  read offline from a temporary ``KERAS_HOME``); the per-step seconds come from the run's
  ``metrics.json`` ``timings`` list, "other" is the process time they leave unexplained;
- the Keras guide's fine-tuning epoch (``image_dataset_from_directory`` with
  ``validation_split=0.2`` + ``.cache().prefetch``, ``peer.guide_model`` with the base trainable, one
  epoch of ``peer.guide_fit``; the caches are filled by one pass first, as the frozen phase before
  it would have): its images/s against tlkeras ``full``'s phase-2 epoch;
- at ``--recipe_frozen_at`` only: the guide's frozen 10 epochs as a whole process
  (``defaults.py``'s ``recipe`` worker, its naive-export check subtracted as ``cifar10.py`` does).

Then a scorer process scores every export's float signature on the 2,000 held-out real images (one
seed: a cost curve, not an accuracy claim). Per strategy and step it fits seconds = a + b·N by least
squares, prints the tables, draws ``benchmarks/scale_cifar10.png`` (seconds per step, peak memory)
and writes the ``scale_cifar10`` section of BENCHMARKS.md with issue 32's targets judged from the
numbers. Everything measured is also kept in ``WORK/results.json`` (``--from_results`` re-renders).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags
from common import (
    IMAGE_EXTENSIONS,
    REPO,
    SHARED,
    BenchConfig,
    machine,
    make_holdout,
    write_result,
    write_section,
)
from defaults import spawn_worker

HERE = Path(__file__).resolve().parent
DATA = SHARED / "data" / "cifar10" / "train"
PLOT = HERE / "scale_cifar10.png"
SECTION = "scale_cifar10"
STRATEGIES = {"feature_extraction": "fe", "full": "full"}
TEST_SPLIT = 0.2
CROP_SIDES = (26, 30)  # of 32 px: the crop's side before resizing back
QUALITIES = (60, 95)

# defaults.py defines --data --weights --image_size --output --job (and its own workers' flags).
flags.DEFINE_list("sizes", ["1000", "10000", "50000"], "Folder sizes N (files), at least two.")
flags.DEFINE_boolean("keep", False, "Keep the temporary folder (data, runs, logs, results.json).")
flags.DEFINE_integer(
    "recipe_frozen_at", 10000, "N at which the recipe's frozen 10 epochs run (0: nowhere)."
)
flags.DEFINE_string("work_dir", None, "Where the temporary folder goes (default: the system's).")
flags.DEFINE_string("from_results", None, "Render the tables from a kept results.json; no runs.")
flags.DEFINE_enum("scale_worker", None, ["fine_tune"], "Internal: one worker of this script.")
FLAGS = flags.FLAGS
FLAGS.set_default("data", str(DATA))
FLAGS.set_default("image_size", 96)  # what --image_size=auto picks for 32-px images (checked)


# --------------------------------------------------------------------------------------------
# Data: a held-out test part of real images, then one class-balanced folder per N


def _variant(image: Any, rng: np.random.Generator) -> tuple[tuple, Any, int]:
    """``(key, transformed image, JPEG quality)``: flip and/or crop-and-resize, re-encoded."""
    from PIL import Image

    w, h = image.size
    flip = bool(rng.random() < 0.5)
    crop = None
    if rng.random() < 0.6:
        lo, hi = (max(1, round(min(w, h) * s / 32)) for s in CROP_SIDES)
        side = int(rng.integers(lo, hi + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = (x, y, side)
    quality = int(rng.integers(QUALITIES[0], QUALITIES[1] + 1))
    out = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
    if crop:
        x, y, side = crop
        out = out.crop((x, y, x + side, y + side)).resize((w, h), Image.Resampling.BICUBIC)
    return (flip, crop, quality), out, quality


def _kind(key: tuple) -> str:
    flip, crop, _ = key
    return "+".join([*(["flip"] if flip else []), *(["crop"] if crop else [])]) or "re-encode"


def _class_variants(sources: list[Path], count: int, seed: int, out: Path) -> dict[str, int]:
    """``count`` distinct variants of ``sources`` written to ``out``; kind -> count.

    One seeded sequence per class (sources in a seeded order, round robin), so the first k
    variants are the same whatever ``count``; a key or byte-identical output seen before (or
    equal to a source file) is drawn again."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    order = [sources[i] for i in rng.permutation(len(sources))]
    seen_keys: set[tuple] = set()
    seen_bytes = {hashlib.sha1(p.read_bytes()).digest() for p in sources}
    kinds: dict[str, int] = {}
    for j in range(count):
        source = order[j % len(order)]
        with Image.open(source) as opened:
            image = opened.convert("RGB")
        while True:
            key, variant, quality = _variant(image, rng)
            buffer = io.BytesIO()
            variant.save(buffer, format="JPEG", quality=quality)
            digest = hashlib.sha1(buffer.getvalue()).digest()
            if (source.name, key) not in seen_keys and digest not in seen_bytes:
                break
        seen_keys.add((source.name, key))
        seen_bytes.add(digest)
        (out / f"{source.stem}_v{j:05d}.jpg").write_bytes(buffer.getvalue())
        kinds[_kind(key)] = kinds.get(_kind(key), 0) + 1
    return kinds


def make_folder(pool: Path, n: int, out: Path, seed: int = 0) -> dict[str, Any]:
    """``out/<class>/``: ``n`` class-balanced files from ``pool``, originals first; its counts."""
    classes = sorted(p.name for p in pool.iterdir() if p.is_dir())
    rng = np.random.default_rng(seed)
    record: dict[str, Any] = {"n": n, "originals": 0, "variants": 0, "kinds": {}}
    for c, name in enumerate(classes):
        quota = n // len(classes) + (c < n % len(classes))
        files = sorted(p for p in (pool / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if quota >= len(files):
            originals = files
        else:  # a seeded stratified subset
            originals = [files[i] for i in sorted(rng.choice(len(files), quota, replace=False))]
        (out / name).mkdir(parents=True)
        for path in originals:
            shutil.copyfile(path, out / name / path.name)
        kinds = _class_variants(files, quota - len(originals), seed * 1000 + c + 1, out / name)
        record["originals"] += len(originals)
        record["variants"] += quota - len(originals)
        for kind, k in kinds.items():
            record["kinds"][kind] = record["kinds"].get(kind, 0) + k
    return record


# --------------------------------------------------------------------------------------------
# Processes: wall time and peak memory of each


def run_process(command: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``command`` from the repository root, output to ``log``; (wall s, peak RSS MiB).

    ``os.wait4`` on this one child: its own ``ru_maxrss`` (or that of a process it waited for),
    not ``RUSAGE_CHILDREN``'s maximum over every child this benchmark ever had."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"{command[1:3]} failed ({proc.returncode}):\n" + "\n".join(tail))
    peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return seconds, peak


def _spawn(
    script: str, worker: str, job: dict[str, Any], work: Path, tag: str, env: dict[str, str]
) -> tuple[float, float, dict[str, Any]]:
    """A worker of ``script`` on ``job`` in its own process; (wall s, peak MiB, its result)."""
    job = {**job, "result": str(work / f"{tag}.json")}
    (work / f"{tag}.job.json").write_text(json.dumps(job))
    command = [sys.executable, str(HERE / script), worker, f"--job={work / f'{tag}.job.json'}"]
    seconds, peak = run_process(command, work / f"{tag}.log", env)
    return seconds, peak, json.loads((work / f"{tag}.json").read_text())


def _audit_sampled(run_dir: Path, metrics: dict[str, Any]) -> str:
    """What the run's audit covered (``audit.json``: its ``sampled`` record and split counts)."""
    path = run_dir / "audit.json"
    if not path.is_file():
        return "no audit (audit.json missing)"
    audit = json.loads(path.read_text())
    splits = ", ".join(f"{k} {v:,}" for k, v in (audit.get("splits") or {}).items())
    judged = (audit.get("mislabel_check") or {}).get("judged", "?")
    sampled = audit.get("sampled") or {}
    if sampled:
        return (
            f"every {sampled['every']}th image of each split, {sampled['images']:,} of "
            f"{sampled['of']:,} ({splits}; the probe judged {judged:,})"
        )
    return f"all {audit.get('num_images', '?'):,} images ({splits}; the probe judged {judged:,})"


def run_train(data: Path, work: Path, strategy: str, n: int, env: dict[str, str]) -> dict:
    """``scripts/train.py`` as a user runs it on the folder for ``n``; what the tables need."""
    tag = STRATEGIES[strategy]
    run_dir = work / f"{tag}_{n}"
    command = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        f"--data={data}",
        "--backbone=MobileNet",
        "--backbone_kwargs=alpha=0.25",
        "--weights=imagenet",
        f"--strategy={strategy}",
        f"--output_dir={run_dir}",
        f"--base_dir={work / f'exp_{tag}_{n}'}",
        f"--model_name={tag}",
        *(["--fine_tune_epochs=1"] if strategy == "full" else []),
    ]
    seconds, peak = run_process(command, work / f"{tag}_{n}.log", env)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if "timings" not in metrics:
        raise SystemExit(
            f"{run_dir / 'metrics.json'} has no 'timings' list (per-step seconds): this "
            "tlkeras predates issue 32's step timings; re-run once they have landed."
        )
    versions = sorted(
        (p for p in (work / f"exp_{tag}_{n}" / tag).iterdir() if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    counts = metrics.get("counts") or {}
    return {
        "seconds": seconds,
        "peak_rss_mib": peak,
        "timings": metrics["timings"],
        "phases": [
            {k: p.get(k) for k in ("phase", "epochs_run", "wall_time_s", "epoch_seconds")}
            for p in metrics.get("phases", [])
        ],
        "train_images": _total(counts.get("train")),
        "image_size": (metrics.get("data") or {}).get("image_size"),
        "audit_sampled": _audit_sampled(run_dir, metrics),
        "export": str(versions[-1]),
    }


def _total(count: Any) -> int | None:
    """A split's image count from ``metrics.json``'s ``counts`` (class -> count, or a number)."""
    if isinstance(count, dict):
        return int(sum(count.values()))
    return None if count is None else int(count)


# --------------------------------------------------------------------------------------------
# The recipe's fine-tuning epoch (a worker: its own process)


def _fine_tune_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One epoch of the Keras guide's fine-tuning on ``job["data"]``: seconds and images/s."""
    import keras
    import tensorflow as tf
    from peer import guide_datasets, guide_fit, guide_model

    config = BenchConfig.from_dict(job["config"])
    keras.utils.set_random_seed(0)
    train_ds, validation_ds = guide_datasets(job["data"], config, 0)
    train_images, num_classes = len(train_ds.file_paths), len(train_ds.class_names)
    train_ds = train_ds.cache().prefetch(tf.data.AUTOTUNE)
    validation_ds = validation_ds.cache().prefetch(tf.data.AUTOTUNE)
    # In the guide the frozen phase has filled both caches before fine-tuning starts.
    started = time.perf_counter()
    for ds in (train_ds, validation_ds):
        for _ in ds:
            pass
    fill_s = time.perf_counter() - started
    model, base_model = guide_model(config, num_classes)
    base_model.trainable = True
    _, seconds = guide_fit(model, train_ds, validation_ds, 1e-5, 1, 0)
    return {
        "epoch_s": seconds,
        "train_images": train_images,
        "images_per_s": train_images / seconds,
        "cache_fill_s": fill_s,
    }


# --------------------------------------------------------------------------------------------
# Measuring: every process for every N


def _keras_home(work: Path, weights: str) -> Path:
    """A KERAS_HOME whose models/ holds the shared MobileNet(0.25) file: imagenet, offline."""
    home = work / "keras_home"
    (home / "models").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, home / "models" / Path(weights).name)
    return home


def measure_size(
    n: int, folder: Path, work: Path, config: BenchConfig, env: dict[str, str]
) -> dict[str, Any]:
    """Every process for the folder of ``n`` files, back to back."""
    out: dict[str, Any] = {}
    for strategy in STRATEGIES:
        out[strategy] = run_train(folder, work, strategy, n, env)
        print(f"N={n} {strategy}: {json.dumps(out[strategy])}", flush=True)
    size = (out["feature_extraction"]["image_size"] or [config.image_size])[0]
    if size != config.image_size:
        print(f"N={n}: tlkeras chose {size} px; the recipe runs at {size} too", flush=True)
    recipe_config = {**config.to_dict(), "image_size": int(size)}
    job = {"config": recipe_config, "data": str(folder)}
    seconds, peak, result = _spawn(
        "scale.py", "--scale_worker=fine_tune", job, work, f"recipe_ft_{n}", env
    )
    out["recipe_fine_tune"] = {**result, "seconds": seconds, "peak_rss_mib": peak}
    print(f"N={n} recipe fine-tune: {json.dumps(out['recipe_fine_tune'])}", flush=True)
    if n == FLAGS.recipe_frozen_at:
        export = str(work / f"recipe_frozen_{n}")
        job = {
            "config": recipe_config,
            "pool": str(folder),
            "strategy": "feature_extraction",
            "seed": 0,
            "export_dir": export,
            "naive_export_dir": str(work / f"naive_{n}"),
        }
        seconds, peak, result = _spawn(
            "defaults.py", "--worker=recipe", job, work, f"recipe_frozen_{n}", env
        )
        out["recipe_frozen"] = {
            **result,
            "seconds": seconds - result["naive_export_s"],  # not the recipe's cost
            "peak_rss_mib": peak,
            "export": export,
        }
        print(f"N={n} recipe frozen: {json.dumps(out['recipe_frozen'])}", flush=True)
    out["image_size"] = int(size)
    return out


def _score(work: Path, test: Path, runs: dict[int, dict]) -> dict[str, Any]:
    """Every export's test accuracy, one scorer process per input size."""
    scores: dict[str, Any] = {}
    for size in sorted({r["image_size"] for r in runs.values()}):
        exports = {
            f"{name}_{n}": r[name]["export"]
            for n, r in runs.items()
            if r["image_size"] == size
            for name in (*STRATEGIES, "recipe_frozen")
            if name in r
        }
        job = {"test": str(test), "image_size": size, "exports": exports}
        _, result = spawn_worker("score", job, work, f"score_{size}")
        scores.update(result["accuracy"])
        scores["test_images"] = result["test_images"]
    return scores


def measure(sizes: list[int], config: BenchConfig, work: Path) -> dict[str, Any]:
    """Data, every run and the scores; the whole record ``results.json`` keeps."""
    results: dict[str, Any] = {
        "machine": machine(),  # load average at the start
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": _command(),
        "sizes": sizes,
        "recipe_frozen_at": FLAGS.recipe_frozen_at,
    }
    started = time.perf_counter()
    counts = make_holdout(config.data, TEST_SPLIT, 0, work)  # work/pool, work/test
    results["holdout"] = {split: sum(c.values()) for split, c in counts.items()}
    env = {**os.environ, "KERAS_HOME": str(_keras_home(work, config.weights))}
    env.pop("TF_CONFIG", None)  # a single-machine run, whatever the caller's environment
    runs, folders = {}, {}
    for n in sizes:
        t0 = time.perf_counter()
        folders[n] = make_folder(work / "pool", n, work / f"n{n}")
        print(f"N={n}: {json.dumps(folders[n])} ({time.perf_counter() - t0:.0f} s)", flush=True)
        runs[n] = measure_size(n, work / f"n{n}", work, config, env)
    results["folders"] = {str(n): f for n, f in folders.items()}
    scores = _score(work, work / "test", runs)
    results["runs"] = {str(n): r for n, r in runs.items()}
    results["scores"] = scores
    results["measure_s"] = time.perf_counter() - started
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _command() -> str:
    parts = ["python benchmarks/scale.py"]
    for name in ("sizes", "recipe_frozen_at"):
        if FLAGS[name].present:
            value = FLAGS[name].value
            parts.append(f"--{name}={','.join(value) if isinstance(value, list) else value}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Analysis: per-step seconds, a + b·N, peaks, throughput, targets


def step_seconds(run: dict[str, Any]) -> dict[str, float]:
    """Seconds per step name (repeats summed, first-appearance order), "other" = wall − sum."""
    steps: dict[str, float] = {}
    for t in run["timings"]:
        steps[t["step"]] = steps.get(t["step"], 0.0) + float(t["seconds"])
    steps["other"] = run["seconds"] - sum(steps.values())
    return steps


def fit_line(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """``(a s, b s per file)`` of the least-squares seconds = a + b·N."""
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(values, float), 1)
    return float(a), float(b)


def curves(results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """strategy -> step (then "whole process") -> seconds at each size (0 where absent)."""
    sizes, runs = results["sizes"], results["runs"]
    out: dict[str, dict[str, list[float]]] = {}
    for strategy in STRATEGIES:
        per_n = [step_seconds(runs[str(n)][strategy]) for n in sizes]
        names: list[str] = []
        for steps in per_n:
            names += [s for s in steps if s not in names and s != "other"]
        out[strategy] = {s: [steps.get(s, 0.0) for steps in per_n] for s in [*names, "other"]}
        out[strategy]["whole process"] = [runs[str(n)][strategy]["seconds"] for n in sizes]
    return out


def fine_tune_rate(run: dict[str, Any]) -> tuple[float, str]:
    """tlkeras ``full``'s phase-2 images/s: training images / its (first) epoch's seconds."""
    if not run["train_images"]:
        raise SystemExit("metrics.json has no counts['train']: cannot compute images/s")
    phase = run["phases"][-1] if len(run["phases"]) > 1 else None
    if phase is None:
        raise SystemExit("the full run has no phase 2 in metrics.json['phases']")
    if phase.get("epoch_seconds"):
        return run["train_images"] / float(phase["epoch_seconds"][0]), ""
    # Not in this tlkeras's metrics.json: the phase's wall time over its epochs (an upper bound).
    return run["train_images"] * phase["epochs_run"] / phase["wall_time_s"], "≈"


def _ratio_sizes(sizes: list[int]) -> tuple[int, int]:
    """The pair the memory target compares: (10,000 or the size below the largest, the largest)."""
    big = max(sizes)
    small = 10000 if 10000 in sizes and big > 10000 else sorted(sizes)[-2]
    return small, big


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _pct(p: float, n: int) -> str:
    return f"{100 * p:.1f} ± {100 * math.sqrt(p * (1 - p) / n):.1f} %"


# --------------------------------------------------------------------------------------------
# Output: tables, plot, targets


def fit_table(results: dict[str, Any], lines_out: list[str]) -> None:
    sizes = results["sizes"]
    lines_out += [
        "| strategy | step | " + " | ".join(f"s at {n:,}" for n in sizes) + " | a (s) "
        "| b (ms per 1,000 files) |",
        "|---|---|" + "---|" * len(sizes) + "---|---|",
    ]
    for strategy, steps in curves(results).items():
        for step, values in steps.items():
            a, b = fit_line(sizes, values)
            name = f"**{step}**" if step == "whole process" else step
            lines_out.append(
                f"| {strategy} | {name} | "
                + " | ".join(f"{v:.1f}" for v in values)
                + f" | {a:.1f} | {b * 1e6:,.0f} |"
            )


def size_table(results: dict[str, Any], lines_out: list[str]) -> None:
    scores, n_test = results["scores"], results["scores"]["test_images"]
    lines_out += [
        "| N | process | wall s | peak RSS MiB | scan files/s | test accuracy (one seed) "
        "| fine-tune images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in results["sizes"]:
        r = results["runs"][str(n)]
        rate, approx = fine_tune_rate(r["full"])
        recipe_rate = r["recipe_fine_tune"]["images_per_s"]
        for strategy in STRATEGIES:
            run = r[strategy]
            scan = step_seconds(run).get("scan")
            ft = (
                f"{approx}{rate:.0f} ({rate / recipe_rate:.2f}× the recipe)"
                if strategy == "full"
                else "–"
            )
            lines_out.append(
                f"| {n:,} | tlkeras {strategy} | {run['seconds']:.1f} | "
                f"{run['peak_rss_mib']:.0f} | {f'{n / scan:,.0f}' if scan else '–'} | "
                f"{_pct(scores[f'{strategy}_{n}'], n_test)} | {ft} |"
            )
        ft_run = r["recipe_fine_tune"]
        lines_out.append(
            f"| {n:,} | recipe fine-tuning epoch | {ft_run['seconds']:.1f} | "
            f"{ft_run['peak_rss_mib']:.0f} | – | – | {recipe_rate:.0f} |"
        )
        if "recipe_frozen" in r:
            fr = r["recipe_frozen"]
            lines_out.append(
                f"| {n:,} | recipe frozen ({'+'.join(map(str, fr['epochs']))} epochs) | "
                f"{fr['seconds']:.1f} | {fr['peak_rss_mib']:.0f} | – | "
                f"{_pct(scores[f'recipe_frozen_{n}'], n_test)} | – |"
            )


def targets(results: dict[str, Any]) -> list[str]:
    """Issue 32's targets, judged from the numbers in ``results``."""
    sizes, runs = results["sizes"], results["runs"]
    big, fe_curve = max(sizes), curves(results)["feature_extraction"]
    a, _ = fit_line(sizes, fe_curve["whole process"])
    out = [
        f"- Fixed cost a of a whole `feature_extraction` run: {a:.1f} s (target ≤ 10 s: "
        f"{_verdict(a <= 10)})"
    ]
    at = results["recipe_frozen_at"]
    if str(at) in runs and "recipe_frozen" in runs[str(at)]:
        recipe, fe = runs[str(at)]["recipe_frozen"]["seconds"], runs[str(at)]["feature_extraction"]
        x = recipe / fe["seconds"]
        out.append(
            f"- `feature_extraction` at {at:,} vs the recipe's frozen 10 epochs: {recipe:.1f} / "
            f"{fe['seconds']:.1f} s = {x:.2f}× faster (target ≥ 3×: {_verdict(x >= 3)})"
        )
    else:
        out.append(
            f"- `feature_extraction` vs the recipe's frozen 10 epochs: not run ({at} not in --sizes)"
        )
    scan = step_seconds(runs[str(big)]["feature_extraction"]).get("scan")
    out.append(
        f"- Scan at {big:,} files: {big / scan:,.0f} files/s (target ≥ 5,000: "
        f"{_verdict(big / scan >= 5000)})"
        if scan
        else f"- Scan at {big:,} files: no `scan` step in the timings (not measured)"
    )
    small, big = _ratio_sizes(sizes)
    ratios = {
        name: runs[str(big)][name]["peak_rss_mib"] / runs[str(small)][name]["peak_rss_mib"]
        for name in (*STRATEGIES, "recipe_fine_tune")
    }
    out.append(
        f"- Peak RSS at {big:,} ÷ at {small:,}: "
        + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items())
        + f" (target ≤ 1.5× for feature_extraction and full: "
        f"{_verdict(max(ratios[s] for s in STRATEGIES) <= 1.5)})"
    )
    per_n = {
        n: fine_tune_rate(runs[str(n)]["full"])[0]
        / runs[str(n)]["recipe_fine_tune"]["images_per_s"]
        for n in sizes
    }
    out.append(
        "- Fine-tuning throughput, tlkeras `full` ÷ the recipe: "
        + ", ".join(f"{x:.2f}× at {n:,}" for n, x in per_n.items())
        + f" (target ≥ 0.95× at every N: {_verdict(min(per_n.values()) >= 0.95)})"
    )
    out += _report_audit(results)
    return out


def _report_audit(results: dict[str, Any]) -> list[str]:
    """Report + audit seconds at the largest N, their slope, and what the audit sampled."""
    sizes, big = results["sizes"], max(results["sizes"])
    out = []
    for strategy, steps in curves(results).items():
        parts = {s: steps[s] for s in ("report", "audit") if s in steps}
        if not parts:
            out.append(f"- Report + audit ({strategy}): no `report`/`audit` step in the timings")
            continue
        total = [sum(v) for v in zip(*parts.values(), strict=True)]
        _, b = fit_line(sizes, total)
        run = results["runs"][str(big)][strategy]
        out.append(
            f"- Report + audit at {big:,} ({strategy}): {total[-1]:.1f} s ("
            + ", ".join(f"{s} {v[-1]:.1f} s" for s, v in parts.items())
            + f"; slope {b * 1e6:,.0f} ms per 1,000 files); what the audit says it covered: "
            f"{run['audit_sampled']} (bounded: no numeric target)"
        )
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Left: seconds per step against N (feature_extraction, and full's epochs); right: peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, runs = results["sizes"], results["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    all_curves = curves(results)
    colors = plt.get_cmap("tab20").colors
    for i, (step, values) in enumerate(all_curves["feature_extraction"].items()):
        # Log axes: steps of under 10 ms at a size are left off there.
        points = [(n, v) for n, v in zip(sizes, values, strict=True) if v >= 0.01]
        if not points:
            continue
        if step == "whole process":
            left.plot(*zip(*points, strict=True), "k-o", label=step, linewidth=2)
        else:
            left.plot(*zip(*points, strict=True), "-o", color=colors[i % 20], label=step)
    if "epochs" in all_curves["full"]:
        left.plot(sizes, all_curves["full"]["epochs"], "r--s", label="full: epochs (phase 2)")
    left.set(xscale="log", yscale="log", xlabel="files N", ylabel="seconds")
    left.set_title("feature_extraction: seconds per step")
    left.legend(fontsize=7, ncol=2, loc="best", framealpha=0.6)
    for name, label in (
        ("feature_extraction", "tlkeras feature_extraction"),
        ("full", "tlkeras full (1 fine-tuning epoch)"),
        ("recipe_fine_tune", "recipe: one fine-tuning epoch"),
    ):
        right.plot(sizes, [runs[str(n)][name]["peak_rss_mib"] for n in sizes], "-o", label=label)
    frozen = [
        (n, runs[str(n)]["recipe_frozen"]["peak_rss_mib"])
        for n in sizes
        if "recipe_frozen" in runs[str(n)]
    ]
    if frozen:
        right.plot(*zip(*frozen, strict=True), "k^", label="recipe: frozen 10 epochs")
    right.set(xscale="log", xlabel="files N", ylabel="peak RSS (MiB)", ylim=(0, None))
    for axis in (left, right):
        axis.set_xticks(sizes, [f"{n:,}" for n in sizes])
        axis.minorticks_off()
    right.set_title("peak resident memory per process")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(kinds.items()))


def render(results: dict[str, Any]) -> str:
    info, folders = results["machine"], results["folders"]
    hold = results["holdout"]
    data = "; ".join(
        f"N={int(n):,}: {f['originals']:,} originals + {f['variants']:,} variants"
        + (f" ({_kinds(f['kinds'])})" if f["kinds"] else "")
        for n, f in folders.items()
    )
    sizes = {r["image_size"] for r in results["runs"].values()}
    lines = [
        f"### The cost curve: CIFAR-10 folders of {min(results['sizes']):,} to "
        f"{max(results['sizes']):,} files",
        "",
        f"Generated by `{results['command']}` on {results['date']}; machine: {info.get('cpu')}, "
        f"{info.get('cores')} cores, {info.get('memory_gib', '?')} GiB, load average at the start "
        f"{info.get('load_average')}. Data: the 10,000 CIFAR-10 train images (32x32 JPEGs) split "
        f"by source image first (stratified, split seed 0): {hold['test']:,} real images held out "
        f"for the test score (never copied into a training folder), {hold['pool']:,} in the pool. "
        f"Each folder is class-balanced, made from the pool: {data}. Variants: horizontal flip, "
        f"a {CROP_SIDES[0]}-{CROP_SIDES[1]} px crop resized back to 32, JPEG quality "
        f"{QUALITIES[0]}-{QUALITIES[1]} (every variant re-encoded), distinct, seeded. Input "
        f"{'/'.join(map(str, sorted(sizes)))} px (`--image_size=auto`). Each row is its own fresh "
        "process (interpreter start to exit) with its own peak RSS (`os.wait4`); per-step "
        'seconds from the run\'s `metrics.json` `timings`, "other" = wall − their sum; '
        "a + b·N by least squares over the sizes. Test accuracy: one seed, ± its binomial "
        f"standard error over {results['scores']['test_images']:,} images (a cost curve, not an "
        "accuracy claim). Fine-tuning images/s: training images ÷ the first fine-tuning epoch's "
        "seconds (validation included); the recipe's caches are filled before its epoch, as its "
        "frozen phase would have (≈: the phase's wall time, no per-epoch seconds). The recipe is "
        "the guide's model as written (`benchmarks/peer.py`: random flip and rotation in the model); "
        "tlkeras's default for thumbnails flips only, so part of the difference is augmentation.",
        "",
    ]
    fit_table(results, lines)
    lines.append("")
    size_table(results, lines)
    lines += ["", f"![seconds per step and peak memory against N]({PLOT.relative_to(REPO)})", ""]
    lines += ["Targets (issue 32):", *targets(results)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def _sizes() -> list[int]:
    try:
        sizes = sorted({int(s) for s in FLAGS.sizes})
    except ValueError:
        raise app.UsageError(f"--sizes: expected integers, received {FLAGS.sizes}") from None
    if len(sizes) < 2 or sizes[0] < 10:
        raise app.UsageError(f"--sizes: expected two or more sizes ≥ 10, received {FLAGS.sizes}")
    return sizes


def main(argv: list[str]) -> None:
    if FLAGS.scale_worker:
        job = json.loads(Path(FLAGS.job).read_text())
        write_result(job["result"], _fine_tune_worker(job))
        return
    if FLAGS.from_results:
        results = json.loads(Path(FLAGS.from_results).read_text())
    else:
        config = BenchConfig(
            data=str(Path(FLAGS.data).resolve()),
            weights=str(Path(FLAGS.weights).resolve()),
            image_size=FLAGS.image_size,
        )
        sizes = _sizes()
        work = Path(tempfile.mkdtemp(prefix="tlkeras_bench_scale_", dir=FLAGS.work_dir))
        try:
            results = measure(sizes, config, work)
        finally:
            if FLAGS.keep:
                print(f"kept {work}", flush=True)
            else:
                shutil.rmtree(work, ignore_errors=True)
    text = render(results)
    print(text)
    if FLAGS.output:
        plot(results, PLOT)
        write_section(FLAGS.output, SECTION, text)
    elif FLAGS.keep or FLAGS.from_results:
        where = Path(FLAGS.from_results).parent if FLAGS.from_results else work
        plot(results, where / PLOT.name)
        print(f"plot: {where / PLOT.name}")
    else:
        print("plot: not drawn (--output='' without --keep)")
    print(f"({results.get('measure_s', 0):.0f} s measuring)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    app.run(main)
