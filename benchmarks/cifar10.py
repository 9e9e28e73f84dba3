"""Seed 001 on its own data: CIFAR-10, frozen features against fine-tuning, and the input size.

    python benchmarks/cifar10.py                       # the seed-001 table, 2 seeds
    python benchmarks/cifar10.py --table=input_size    # the input-size table, 2 seeds

The 10,000 shared CIFAR-10 images (32x32) are split once into a pool and a held-out test part
(``common.make_holdout``, stratified, split seed 0, 20 %); every contender is its own fresh
process given only the pool (it splits off its own validation data), and a scorer process scores
each export's float signature on the test part, which nothing trained or early-stopped on.

``--table=seed001``: at the size ``--image_size=auto`` chooses for 32-px images, the Keras guide's
recipe with the frozen base (``defaults.py``'s ``recipe`` worker: 10 epochs, Adam 1e-3, early
stopping), and ``scripts/train.py`` with its defaults for ``feature_extraction``, ``partial`` at
the advisor's block (``tlkeras.advise`` on the pool) and ``full`` (``--fine_tune_epochs``). Writes
the ``seed001_cifar10`` section of BENCHMARKS.md.

``--table=input_size``: ``feature_extraction`` and ``full`` at each of ``--sizes``, the same epochs
for every size, ``--noreport`` (the report's cost is not the size's); the ``input_size_cifar10``
section.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import app, flags
from common import SHARED, BenchConfig, machine, make_holdout, write_section
from defaults import run_tlkeras, spawn_worker

HERE = Path(__file__).resolve().parent
DATA = SHARED / "data" / "cifar10" / "train"
TABLES = ("seed001", "input_size")

# defaults.py defines --data --weights --seeds --test_split --output (and its workers'); here
# they default to CIFAR-10, 2 seeds and a 20 % test part.
flags.DEFINE_enum("table", "seed001", TABLES, "Which table to measure.")
flags.DEFINE_integer("fine_tune_epochs", 5, "Fine-tuning budget of partial and full.")
flags.DEFINE_list("sizes", ["64", "96", "128", "224"], "input_size: the square sizes measured.")
FLAGS = flags.FLAGS
FLAGS.set_default("data", str(DATA))
FLAGS.set_default("seeds", 2)
FLAGS.set_default("test_split", 0.2)


def auto_size(data: str) -> tuple[int, str]:
    """What ``--image_size=auto`` chooses for ``data`` on MobileNet, and why."""
    from tlkeras.data import source_resolution
    from tlkeras.models.weights import auto_image_size

    return auto_image_size(source_resolution(data), "MobileNet", "imagenet")


def _pm(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _score(work: Path, base: dict[str, Any], exports: dict[str, str], size: int, tag: str) -> dict:
    _, scores = spawn_worker(
        "score", {**base, "image_size": size, "exports": exports}, work, f"score_{tag}"
    )
    return scores["accuracy"]


def _tlkeras(
    base: dict, work: Path, strategy: str, seed: int, size: int, flags_: list[str]
) -> dict:
    tag = f"{strategy}_{size}_{seed}"
    job = {
        **base,
        "config": {**base["config"], "image_size": size},
        "strategy": strategy,
        "seed": seed,
        "tlkeras_flags": flags_,
    }
    seconds, result = run_tlkeras(job, work, tag)
    result = {**result, "seconds": seconds}
    result["accuracy"] = _score(work, base, {"tlkeras": result["export_dir"]}, size, tag)["tlkeras"]
    print(strategy, size, seed, json.dumps(result), flush=True)
    return result


def _recipe(base: dict, work: Path, seed: int, size: int) -> dict:
    tag = f"recipe_{size}_{seed}"
    export, naive = str(work / tag), str(work / f"naive_{tag}")
    job = {
        **base,
        "config": {**base["config"], "image_size": size},
        "strategy": "feature_extraction",
        "seed": seed,
        "export_dir": export,
        "naive_export_dir": naive,
    }
    seconds, result = spawn_worker("recipe", job, work, tag)
    result = {**result, "seconds": seconds - result["naive_export_s"]}
    result["accuracy"] = _score(work, base, {"recipe": export}, size, tag)["recipe"]
    print("recipe", size, seed, json.dumps(result), flush=True)
    return result


def _kept_text(rs: list[dict]) -> str:
    """Which phase each seed's final model came from (``metrics.json``'s ``kept``)."""
    kept = [r.get("kept") or {} for r in rs]
    return "/".join(str(k.get("phase", "?")) for k in kept)


def seed001_table(base: dict, work: Path, size: int, why: str, seeds: int) -> str:
    job = {**base, "config": {**base["config"], "image_size": size}}
    _, advice = spawn_worker("advise", job, work, "advise")
    k = advice["fine_tune_at"]
    if k is None:  # the advisor chose feature_extraction or full: partial at the top quarter
        k = -max(1, advice["num_blocks"] // 4)
    ft = [f"--fine_tune_epochs={FLAGS.fine_tune_epochs}"]
    rows: dict[str, list[dict]] = {
        "recipe (frozen)": [],
        "feature_extraction": [],
        "partial": [],
        "full": [],
    }
    for seed in range(seeds):
        rows["recipe (frozen)"].append(_recipe(base, work, seed, size))
        rows["feature_extraction"].append(
            _tlkeras(base, work, "feature_extraction", seed, size, [])
        )
        rows["partial"].append(
            _tlkeras(base, work, "partial", seed, size, [*ft, f"--fine_tune_at={k}"])
        )
        rows["full"].append(_tlkeras(base, work, "full", seed, size, ft))
    fe = statistics.mean(r["accuracy"] for r in rows["feature_extraction"])
    lines = [
        "### Seed 001 on CIFAR-10: frozen features vs fine-tuning",
        "",
        _header(
            base,
            seeds,
            f"python benchmarks/cifar10.py --seeds={seeds} --fine_tune_epochs={FLAGS.fine_tune_epochs}",
        )
        + f" Input {size}x{size} for every contender: what `--image_size=auto` chooses here "
        f"({why}). The advisor (`tlkeras.advise` on the pool) said `{advice['strategy']}` "
        f"({advice['case']}, probe gain {advice['probe_gain']:.2f}); `partial` trains blocks "
        f"≥ {k} of {advice['num_blocks']}. Fine-tuning budget {FLAGS.fine_tune_epochs} epochs.",
        "",
        "| contender | process s | epochs per phase | kept phase | test accuracy | vs tlkeras feature_extraction |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        accuracy = [100 * r["accuracy"] for r in rs]
        epochs = "/".join("+".join(str(e) for e in r["epochs"]) for r in rs)
        kept = _kept_text(rs) if name != "recipe (frozen)" else "–"
        delta = statistics.mean(accuracy) - 100 * fe
        lines.append(
            f"| {name} | {_pm([r['seconds'] for r in rs])} | {epochs} | {kept} "
            f"| {_pm(accuracy)} % | {delta:+.1f} points |"
        )
    full = statistics.mean(r["accuracy"] for r in rows["full"])
    part = statistics.mean(r["accuracy"] for r in rows["partial"])
    recipe = statistics.mean(r["accuracy"] for r in rows["recipe (frozen)"])
    lines += [
        "",
        "Targets (issue 30), means over the seeds:",
        f"- `full` ≥ `feature_extraction` + 4 points: {100 * (full - fe):+.1f} "
        f"({'met' if full - fe >= 0.04 else 'missed'})",
        f"- `feature_extraction` ≥ the recipe's frozen 10 epochs: {100 * (fe - recipe):+.1f} "
        f"({'met' if fe >= recipe else 'missed'})",
        f"- `partial` between or above: {100 * part:.1f} % against {100 * fe:.1f} and "
        f"{100 * full:.1f} ({'met' if part >= min(fe, full) else 'missed'})",
    ]
    return "\n".join(lines)


def input_size_table(base: dict, work: Path, sizes: list[int], seeds: int) -> str:
    flags_ = ["--noreport", f"--fine_tune_epochs={FLAGS.fine_tune_epochs}"]
    rows = {
        (size, strategy): [
            _tlkeras(base, work, strategy, seed, size, flags_) for seed in range(seeds)
        ]
        for size in sizes
        for strategy in ("feature_extraction", "full")
    }
    lines = [
        "### CIFAR-10 (32-px images): accuracy and time against the input size",
        "",
        _header(
            base,
            seeds,
            f"python benchmarks/cifar10.py --table=input_size --seeds={seeds} "
            f"--fine_tune_epochs={FLAGS.fine_tune_epochs}"
            + f" --sizes={','.join(map(str, sizes))}",
        )
        + f" `scripts/train.py` defaults with `--noreport`, `--fine_tune_epochs="
        f"{FLAGS.fine_tune_epochs}` for `full` at every size.",
        "",
        "| size | feature_extraction s | feature_extraction test accuracy | full s "
        "| full test accuracy | full − feature_extraction |",
        "|---|---|---|---|---|---|",
    ]
    for size in sizes:
        fe, full = rows[(size, "feature_extraction")], rows[(size, "full")]
        gain = 100 * (
            statistics.mean(r["accuracy"] for r in full)
            - statistics.mean(r["accuracy"] for r in fe)
        )
        lines.append(
            f"| {size} | {_pm([r['seconds'] for r in fe])} | "
            f"{_pm([100 * r['accuracy'] for r in fe])} % | {_pm([r['seconds'] for r in full])} | "
            f"{_pm([100 * r['accuracy'] for r in full])} % | {gain:+.1f} points |"
        )
    return "\n".join(lines)


def _header(base: dict, seeds: int, command: str) -> str:
    info, counts = machine(), base["counts"]
    return (
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{info['cores']} cores, load average at the start {info.get('load_average')}. Pool "
        f"{sum(counts['pool'].values())} images, held-out test {sum(counts['test'].values())} "
        f"(stratified, never trained or early-stopped on); seeds 0–{seeds - 1}, mean ± standard "
        "deviation over them. Time: each contender's whole process, interpreter start to a "
        "verified export."
    )


def main(argv: list[str]) -> None:
    config = BenchConfig(
        data=str(Path(FLAGS.data).resolve()),
        weights=str(Path(FLAGS.weights).resolve()),
        fine_tune_epochs=FLAGS.fine_tune_epochs,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tlkeras_bench_cifar10_") as tmp:
        work = Path(tmp)
        counts = make_holdout(config.data, FLAGS.test_split, 0, work / "split")
        base = {
            "config": config.to_dict(),
            "pool": str(work / "split" / "pool"),
            "test": str(work / "split" / "test"),
            "counts": counts,
        }
        if FLAGS.table == "seed001":
            size, why = auto_size(config.data)
            text = seed001_table(base, work, size, why, FLAGS.seeds)
        else:
            text = input_size_table(base, work, [int(s) for s in FLAGS.sizes], FLAGS.seeds)
    print(text)
    print(f"({time.perf_counter() - started:.0f} s)")
    if FLAGS.output:
        name = "seed001_cifar10" if FLAGS.table == "seed001" else "input_size_cifar10"
        write_section(FLAGS.output, name, text)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    app.run(main)
