"""The fine-tuning recipe, one knob at a time: each row is today's defaults plus one technique.

    python benchmarks/recipe.py                                          # ants/bees, 3 seeds
    python benchmarks/recipe.py --data=../shared/data/cats_dogs/train --image_size=128

The data is split once into a ``pool`` and a held-out ``test`` part (``common.make_holdout``,
stratified, split seed 0). For every row and seed, ``scripts/train.py --strategy=full`` runs as its
own fresh process on the pool with the row's flags (it splits off its own validation part, early
stops on it and exports a verified SavedModel); a scorer process then scores every export's float
signature on the test part, which no run trained or early-stopped on. Every row has the same
fine-tuning budget (``--fine_tune_epochs``) and the same seeds, so each seed is a paired
comparison with the ``defaults`` row.

A technique *helps* on a data set when its mean paired gain over the defaults row exceeds the
seed spread: the larger of the defaults row's standard deviation over seeds and the standard
deviation of the paired gains. It becomes a default only where it helps on both data sets; the
verdict table (written when both data sets' results exist) says so per row.

Writes ``recipe_<data>.json`` beside this file (the raw runs) and the ``recipe_<data>`` and
``recipe_verdict`` sections of BENCHMARKS.md.
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
from common import (
    REPO,
    BenchConfig,
    machine,
    make_holdout,
    score_exports,
    timed,
    write_result,
    write_section,
)

HERE = Path(__file__).resolve().parent
BASELINE = "defaults"
# Each row: scripts/train.py flags on top of the defaults (the library's names, one knob each).
ROWS: dict[str, list[str]] = {
    BASELINE: [],
    "layer_decay": ["--layer_decay=0.8"],
    "gradual": ["--unfreeze_stages=3"],
    "lr_auto": ["--learning_rate=auto"],
    "cosine": ["--schedule=cosine", "--warmup_epochs=1"],
    "ema": ["--ema"],
    "strong": ["--augment_preset=strong"],
    "mixup": ["--augment_preset=mixup"],
    "cutmix": ["--augment_preset=cutmix"],
    "mixed_bfloat16": ["--mixed_precision=mixed_bfloat16"],
}
_B = BenchConfig()

flags.DEFINE_string("data", _B.data, "Folder with one subfolder per class.")
flags.DEFINE_string("weights", _B.weights, "MobileNet(alpha=0.25) no-top weights file.")
flags.DEFINE_integer("seeds", 3, "Training seeds 0..N-1.")
flags.DEFINE_list("rows", list(ROWS), f"Some of {list(ROWS)}.")
flags.DEFINE_float("test_split", 0.3, "Fraction of --data held out for scoring the exports.")
flags.DEFINE_integer("image_size", _B.image_size, "Square image size.")
flags.DEFINE_integer("fine_tune_epochs", 5, "The fine-tuning budget of every row.")
flags.DEFINE_string("output", str(REPO / "BENCHMARKS.md"), "Report to update; '' to skip.")
flags.DEFINE_enum("worker", None, ["score"], "Internal: one worker.")
flags.DEFINE_string("job", None, "Internal: the worker's job file (JSON).")
FLAGS = flags.FLAGS


def _train(job: dict[str, Any], flags_: list[str], work: Path, tag: str) -> dict[str, Any]:
    """One ``scripts/train.py`` process; its wall time and what its metrics.json says."""
    run_dir = work / f"{tag}_run"
    command = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        f"--data={job['pool']}",
        "--strategy=full",
        f"--seed={job['seed']}",
        "--backbone=MobileNet",
        f"--backbone_kwargs=alpha={job['alpha']}",
        f"--weights={job['weights']}",
        f"--image_size={job['image_size']}",
        f"--fine_tune_epochs={job['fine_tune_epochs']}",
        "--test_split=0",
        "--noreport",  # the same for every row; the report is not what is compared
        f"--output_dir={run_dir}",
        f"--base_dir={work / tag}",
        "--model_name=model",
        *flags_,
    ]
    seconds = timed(command, work / f"{tag}.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    finder = metrics.get("learning_rate_finder") or {}
    return {
        "seconds": round(seconds, 2),
        "phase_s": [round(p["wall_time_s"], 2) for p in metrics["phases"]],
        "epochs": [p["epochs_run"] for p in metrics["phases"]],
        "learning_rate": metrics["phases"][0]["learning_rate"],
        "suggested_learning_rate": finder.get("suggestion"),
        "export": str(work / tag / "model" / "1"),
    }


def _score(job: dict[str, Any], exports: dict[str, str], work: Path) -> dict[str, float]:
    job = {"test": job["test"], "image_size": job["image_size"], "exports": exports}
    job["result"] = str(work / "score.json")
    (work / "score.job.json").write_text(json.dumps(job))
    command = [sys.executable, str(HERE / "recipe.py"), "--worker=score"]
    timed(command + [f"--job={work / 'score.job.json'}"], work / "score.log")
    return json.loads((work / "score.json").read_text())["accuracy"]


def _stdev(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def judge(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per row: mean accuracy, paired gain over the defaults row, its spread and the verdict.

    ``runs[row]`` lists one result per seed, in seed order, each with ``accuracy`` (a fraction)
    and ``seconds``. The defaults row's own entry has gain 0 and verdict ``"baseline"``.
    """
    base = runs[BASELINE]
    base_acc = [r["accuracy"] for r in base]
    base_s = statistics.mean(r["seconds"] for r in base)
    out = {}
    for row, results in runs.items():
        acc = [r["accuracy"] for r in results]
        gains = [a - b for a, b in zip(acc, base_acc, strict=True)]
        spread = max(_stdev(base_acc), _stdev(gains))
        gain = statistics.mean(gains)
        if row == BASELINE:
            verdict = "baseline"
        elif gain > spread:
            verdict = "helps"
        elif gain < -spread:
            verdict = "hurts"
        else:
            verdict = "within the seed spread"
        out[row] = {
            "accuracy": statistics.mean(acc),
            "accuracy_sd": _stdev(acc),
            "gain": gain,
            "spread": spread,
            "verdict": verdict,
            "seconds": statistics.mean(r["seconds"] for r in results),
            "time_ratio": statistics.mean(r["seconds"] for r in results) / base_s,
        }
    return out


def report(result: dict[str, Any]) -> str:
    """The ``recipe_<data>`` section: one row per technique."""
    info, runs, judged = result["machine"], result["runs"], judge(result["runs"])
    seeds = len(runs[BASELINE])
    counts = result["counts"]
    lines = [
        f"### Recipe ablation: `{result['name']}` (`benchmarks/recipe.py`)",
        "",
        f"Generated by `python benchmarks/recipe.py --data={result['data']} "
        f"--image_size={result['image_size']} --fine_tune_epochs={result['fine_tune_epochs']}` on "
        f"{result['date']}; {info.get('cores')} cores, load average at the start "
        f"{info.get('load_average')}. Pool {sum(counts['pool'].values())} images (each run splits "
        f"its own validation part), held-out test {sum(counts['test'].values())} images; "
        f"`--strategy=full`, MobileNet(alpha=0.25) ImageNet weights, {result['image_size']} px, "
        f"fine-tuning budget {result['fine_tune_epochs']} epochs for every row, seeds "
        f"0–{seeds - 1} (paired: seed s of every row shares its validation split). Gain: mean "
        "paired difference from the defaults row; spread: the larger of the defaults row's "
        "standard deviation and the gains' standard deviation.",
        "",
        "| row | flags | test accuracy | gain (points) | spread | verdict | process s | time ÷ "
        "defaults | epochs per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, j in judged.items():
        flags_ = " ".join(f"`{f}`" for f in ROWS.get(row, [])) or "—"
        epochs = "/".join("+".join(str(e) for e in r["epochs"]) for r in runs[row])
        lines.append(
            f"| {row} | {flags_} | {100 * j['accuracy']:.1f} ± {100 * j['accuracy_sd']:.1f} % | "
            f"{100 * j['gain']:+.1f} | {100 * j['spread']:.1f} | {j['verdict']} | "
            f"{j['seconds']:.1f} | {j['time_ratio']:.2f}× | {epochs} |"
        )
    auto = [r["suggested_learning_rate"] for r in runs.get("lr_auto", [])]
    if auto:
        default = runs[BASELINE][0]["learning_rate"]
        found = ", ".join(f"{a:.2g}" for a in auto if a is not None)
        lines += [
            "",
            f"LR finder (`lr_auto` row): suggested head learning rates {found} (one per seed) "
            f"against the default {default:g}.",
        ]
    return "\n".join(lines)


def verdict_report(results: dict[str, dict[str, Any]]) -> str:
    """The ``recipe_verdict`` section: which rows help on every data set measured."""
    judged = {name: judge(r["runs"]) for name, r in results.items()}
    names = sorted(judged)
    lines = [
        "### Recipe ablation: the verdict over the data sets",
        "",
        "A technique becomes a default only where it helps (gain beyond the seed spread) on "
        "every data set below.",
        "",
        "| row | " + " | ".join(f"{n} gain / spread" for n in names) + " | default? |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    rows = [r for r in ROWS if all(r in judged[n] for n in names) and r != BASELINE]
    for row in rows:
        cells = [
            f"{100 * judged[n][row]['gain']:+.1f} / {100 * judged[n][row]['spread']:.1f} "
            f"({judged[n][row]['verdict']})"
            for n in names
        ]
        on = all(judged[n][row]["verdict"] == "helps" for n in names)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {'yes' if on else 'no'} |")
    return "\n".join(lines)


def _result_path(name: str) -> Path:
    return HERE / f"recipe_{name}.json"


def main(argv: list[str]) -> None:
    if FLAGS.worker:
        job = json.loads(Path(FLAGS.job).read_text())
        write_result(job["result"], score_exports(job))
        return
    bad = [r for r in FLAGS.rows if r not in ROWS]
    if bad or BASELINE not in FLAGS.rows:
        raise SystemExit(f"--rows: expected {BASELINE!r} and some of {list(ROWS)}, received {bad}")
    config = BenchConfig(data=str(Path(FLAGS.data).resolve()), weights=FLAGS.weights)
    name = Path(FLAGS.data).resolve().parent.name
    started, info = time.perf_counter(), machine()
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in FLAGS.rows}
    with tempfile.TemporaryDirectory(prefix="tlkeras_bench_recipe_") as tmp:
        work = Path(tmp)
        counts = make_holdout(config.data, FLAGS.test_split, 0, work / "split")
        job = {
            "pool": str(work / "split" / "pool"),
            "test": str(work / "split" / "test"),
            "alpha": config.alpha,
            "weights": str(Path(config.weights).resolve()),
            "image_size": FLAGS.image_size,
            "fine_tune_epochs": FLAGS.fine_tune_epochs,
        }
        # Seed-major: a load spike on the machine lands on every row of one seed, not one row.
        for seed in range(FLAGS.seeds):
            for row in FLAGS.rows:
                result = _train({**job, "seed": seed}, ROWS[row], work, f"{row}_{seed}")
                runs[row].append(result)
                print(row, seed, json.dumps(result), flush=True)
        exports = {f"{row}_{i}": r["export"] for row, rs in runs.items() for i, r in enumerate(rs)}
        accuracy = _score(job, exports, work)
    for row, results in runs.items():
        for i, r in enumerate(results):
            r["accuracy"] = accuracy[f"{row}_{i}"]
            del r["export"]
    result = {
        "name": name,
        "data": FLAGS.data,
        "image_size": FLAGS.image_size,
        "fine_tune_epochs": FLAGS.fine_tune_epochs,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": info,
        "counts": counts,
        "runs": runs,
    }
    _result_path(name).write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    print(text)
    print(f"({time.perf_counter() - started:.0f} s)")
    if FLAGS.output:
        write_section(FLAGS.output, f"recipe_{name}", text)
        saved = {p.stem[len("recipe_") :]: p for p in sorted(HERE.glob("recipe_*.json"))}
        if len(saved) > 1:
            results = {n: json.loads(p.read_text()) for n, p in saved.items()}
            write_section(FLAGS.output, "recipe_verdict", verdict_report(results))


if __name__ == "__main__":
    app.run(main)
