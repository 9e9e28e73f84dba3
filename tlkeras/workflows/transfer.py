"""Compare strategies, and the offline transfer story (above training, beside the advisor and sweep).

``compare_strategies`` trains each strategy on the same data and split and returns one table
(strategy, trainable params, wall time, test accuracy); ``transfer_story`` runs it on digits 5–9 with
a backbone pre-trained on 0–4 (``tlkeras.fitting.pretrain.pretrained_weights``), so the scratch row shows what
transfer bought. ``train_with_baselines`` is ``tlkeras.train`` followed by the two baselines a
transferred model must be judged against, on the same split: the same network from scratch with the
same budget, and a logistic regression on the raw pixels (the main job's closing table).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkeras.data import dataset_arrays, is_digits
from tlkeras.fitting import reports
from tlkeras.fitting.config import set_seed
from tlkeras.fitting.loading import DataRequest, ModelRequest, load_and_build, load_data
from tlkeras.fitting.pretrain import pretrained_record, pretrained_weights
from tlkeras.fitting.runner import trainable_params
from tlkeras.models.backbones import get_backbone
from tlkeras.models.blocks import blocks
from tlkeras.models.strategy import Strategy
from tlkeras.models.weights import (
    DEFAULT_BACKBONE,
    DEFAULT_BACKBONE_KWARGS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SOURCE,
    DEFAULT_TARGET,
    backbone_kwargs_for,
)
from tlkeras.workflows import training

STRATEGIES = tuple(s.value for s in Strategy)


# --------------------------------------------------------------------------------------------
# Strategy comparison


@dataclass(frozen=True)
class ComparisonRow:
    """One strategy's result on the shared split."""

    strategy: str
    trainable_params: int
    total_params: int
    wall_seconds: float
    accuracy: float
    epochs: int
    fine_tune_at: int | None = None
    weights: str | None = None


@dataclass(frozen=True)
class Comparison:
    """Every strategy on the same data and split: ``str(table)`` prints it."""

    rows: tuple[ComparisonRow, ...]
    data: str
    backbone: str
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, strategy: str) -> ComparisonRow:
        for r in self.rows:
            if r.strategy == strategy:
                return r
        raise KeyError(strategy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "backbone": self.backbone,
            **self.extra,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def __str__(self) -> str:
        header = (
            f"{'strategy':<20}{'trainable params':>18}{'wall time (s)':>15}{'test accuracy':>15}"
        )
        lines = [f"data: {self.data}   backbone: {self.backbone}", header, "-" * len(header)]
        for r in self.rows:
            name = r.strategy + (f" (k={r.fine_tune_at})" if r.fine_tune_at is not None else "")
            lines.append(
                f"{name:<20}{r.trainable_params:>18,}{r.wall_seconds:>15.1f}{r.accuracy:>15.4f}"
            )
        if self.extra.get("source_val_accuracy") is not None:
            lines.append(
                f"source task {self.extra.get('source')}: validation accuracy "
                f"{self.extra['source_val_accuracy']:.4f} (pre-training, {self.extra.get('weights')})"
            )
        return "\n".join(lines)

    def save(self, output_dir: str | Path) -> dict[str, Path]:
        """Write ``comparison.json`` and ``comparison.png`` (accuracy and wall time per strategy)."""
        plt = reports.pyplot()
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "comparison.json", "png": out / "comparison.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2))
        names = [r.strategy for r in self.rows]
        fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
        bars = ax_acc.bar(names, [r.accuracy for r in self.rows], color="tab:blue")
        ax_acc.bar_label(bars, fmt="%.3f")
        ax_acc.set_ylim(0, 1.05)
        ax_acc.set_ylabel("test accuracy")
        ax_time.bar(names, [r.wall_seconds for r in self.rows], color="tab:orange")
        ax_time.set_ylabel("wall time (s)")
        for ax in (ax_acc, ax_time):
            ax.tick_params(axis="x", rotation=20)
        fig.suptitle(f"{self.backbone} on {self.data}")
        fig.tight_layout()
        fig.savefig(paths["png"], dpi=100)
        plt.close(fig)
        return paths


def check_strategies(strategies: Sequence[str]) -> None:
    """A non-empty list of strategy names (``STRATEGIES``)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if not strategies or unknown:
        raise ValueError(
            f"strategies: expected a non-empty subset of {','.join(STRATEGIES)}, "
            f"received {','.join(map(str, strategies))}"
        )


def _default_fine_tune_at(model: keras.Model) -> int:
    return max(1, len(blocks(model)) // 2)


def compare_strategies(
    data: Any,
    *,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    weights: str | None = "imagenet",
    strategies: Sequence[str] = STRATEGIES,
    fine_tune_at: int | None = None,
    config: Any = None,
    augment: Any = None,
    output_dir: str | Path | None = None,
    verbose: int = 0,
    report: bool = True,
) -> Comparison:
    """Train each strategy on the same ``data`` (one ``tlkeras.data.ImageData``, so one split).

    ``scratch`` uses random init (``weights`` is ignored for it); the other strategies start from
    ``weights`` (anything ``resolve_weights`` takes). Each run goes through
    ``tlkeras.workflows.training.fit`` in ``output_dir/<strategy>`` (a temporary directory when ``None``),
    and is scored on ``data.test``.

    Args:
        data: a ``tlkeras.data.ImageData``.
        fine_tune_at: the ``partial`` boundary (default: half the backbone's blocks).
        config: a ``tlkeras.workflows.training.TrainConfig`` shared by every strategy.
        augment: an ``AugmentConfig`` or ``None``.
        report: each run writes its ``report.html`` (``tlkeras.workflows.training.fit``).

    Returns:
        A ``Comparison``; ``.save(dir)`` writes the JSON and the plot.
    """
    check_strategies(strategies)
    if data.test is None:
        raise ValueError("data: expected a test split to score every strategy on, received none")
    # As given (no source model's width filled in): the weights may be a pre-trained file.
    request = ModelRequest(backbone, dict(backbone_kwargs or {}), weights, augment=augment)
    resolved = load_and_build(request, data, build=False).weights
    config = config or training.TrainConfig()
    root = (
        Path(output_dir)
        if output_dir is not None
        else Path(tempfile.mkdtemp(prefix="tlkeras_compare_"))
    )
    rows = []
    for strategy in strategies:
        init = None if strategy == "scratch" else resolved
        model = load_and_build(
            dataclasses.replace(
                request,
                weights=init,
                strategy="feature_extraction" if strategy == "partial" else strategy,
            ),
            data,
        ).model
        k = (fine_tune_at or _default_fine_tune_at(model)) if strategy == "partial" else None
        set_seed(config.seed)
        started = time.perf_counter()
        result = training.fit(
            model,
            data,
            config,
            run_dir=root / strategy,
            strategy=strategy,
            fine_tune_at=k,
            overwrite=True,
            verbose=verbose,
            report=report,
        )
        seconds = time.perf_counter() - started
        rows.append(
            ComparisonRow(
                strategy=strategy,
                trainable_params=trainable_params(result.model),
                total_params=int(result.model.count_params()),
                wall_seconds=round(seconds, 2),
                accuracy=float(result.metrics["accuracy"]),
                epochs=len(result.history.get("loss", [])),
                fine_tune_at=k,
                weights=None if init is None else str(init),
            )
        )
    extra: dict[str, Any] = {"weights": resolved}
    record = pretrained_record(resolved) if resolved not in (None, "imagenet") else {}
    if record:  # weights from pretrained_weights: say what the source task reached
        extra.update(
            source=record.get("source"),
            source_val_accuracy=record.get("source_val_accuracy"),
            pretrain_seconds=record.get("train_seconds"),
        )
    return Comparison(tuple(rows), data=data.source, backbone=backbone, extra=extra)


def transfer_story(
    source: str = DEFAULT_SOURCE,
    target: str = DEFAULT_TARGET,
    *,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    pretrain_epochs: int | None = None,
    strategies: Sequence[str] = STRATEGIES,
    config: Any = None,
    fine_tune_at: int | None = None,
    output_dir: str | Path | None = None,
    verbose: int = 0,
    report: bool = True,
) -> Comparison:
    """Pre-train on ``source``, then train ``target`` with every strategy: what did transfer buy?

    Returns the ``compare_strategies`` table with the source task's record in ``extra``.
    """
    spec = get_backbone(backbone)
    if backbone_kwargs is None:
        backbone_kwargs = dict(DEFAULT_BACKBONE_KWARGS) if spec.name == DEFAULT_BACKBONE else {}
    config = config or training.TrainConfig()
    path = pretrained_weights(
        source, spec.name, backbone_kwargs, image_size, pretrain_epochs, seed=config.seed
    )
    size = max(image_size, spec.min_size)
    data = load_data(
        DataRequest(target, batch_size=config.batch_size, seed=config.seed), (size, size)
    )
    table = compare_strategies(
        data,
        backbone=spec.name,
        backbone_kwargs=backbone_kwargs,
        weights=str(path),
        strategies=strategies,
        fine_tune_at=fine_tune_at,
        config=config,
        output_dir=output_dir,
        verbose=verbose,
        report=report,
    )
    return dataclasses.replace(table, extra={**table.extra, "target": target})


# --------------------------------------------------------------------------------------------
# The main job's baselines

# The pixel baseline sees the images at the digits' native 8x8, in grey.
PIXEL_SIZE = 8
BASELINES_FILE = "baselines.json"


def wants_baselines(baselines: bool | None, data_source: Any) -> bool:
    """``None``: on for the embedded digits (seconds), off for user data (a second full run)."""
    return is_digits(data_source) if baselines is None else bool(baselines)


def pixel_baseline(data: Any, size: int = PIXEL_SIZE) -> dict[str, Any]:
    """A logistic regression on the grey pixels at ``size`` x ``size`` (train + validation split),
    scored on the test split: what no deep learning at all reaches on the same images."""
    from sklearn.linear_model import LogisticRegression

    def grey(images: Any) -> np.ndarray:
        small = tf.image.resize(tf.cast(images, tf.float32), (size, size), "area")
        return tf.reduce_mean(small, axis=-1).numpy().reshape(len(small), -1) / 255.0

    started = time.perf_counter()
    x, y = dataset_arrays([data.train, data.validation], map_images=grey)
    tx, ty = dataset_arrays(data.test, map_images=grey)
    model = LogisticRegression(max_iter=5000).fit(x, y)
    return {
        "accuracy": float(model.score(tx, ty)),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "train_examples": int(len(y)),
        "pixels": f"{size}x{size} grey",
    }


def train_with_baselines(
    data_source: Any = training.DEFAULT_DATA, *, baselines: bool | None = None, **kwargs: Any
) -> training.RunResult:
    """``tlkeras.train(data_source, **kwargs)``; then, when ``wants_baselines``, the same network
    trained from scratch with the same configuration (``strategy="scratch"``: all epochs end to end)
    and ``pixel_baseline``, both on the run's own split. Prints the closing table and writes
    ``baselines.json`` in the run directory."""
    started = time.perf_counter()
    result = training.train(data_source, **kwargs)
    seconds = time.perf_counter() - started
    if not wants_baselines(baselines, data_source):
        return result
    # train()'s arguments as it saw them, its defaults filled in: the baselines reuse them.
    bound = inspect.signature(training.train).bind(data_source, **kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    config = training.resolve_config(
        args["config"], args["weights"], **args.pop("config_overrides")
    )
    size = tuple(int(s) for s in result.model.input_shape[1:3])
    data = load_data(
        DataRequest(
            data_source,
            validation=args["validation_data"],
            validation_split=args["validation_split"],
            test_split=args["test_split"],
            max_bad_fraction=args["max_bad_fraction"],
            batch_size=config.batch_size,
            seed=config.seed,
        ),
        size,
    )
    if data.test is None:
        raise ValueError("baselines: expected a test split to score them on, received none")
    verbose = args["verbose"]
    if verbose:
        print(
            f"Baseline: the same network from scratch ({config.epochs + config.fine_tune_epochs} "
            "epochs end to end, same split and settings)",
            flush=True,
        )
    scratch = compare_strategies(
        data,
        backbone=args["backbone"],
        # The transferred network's width (train() fills in the source model's for None).
        backbone_kwargs=backbone_kwargs_for(
            args["backbone"], args["backbone_kwargs"], args["weights"]
        ),
        weights=None,
        strategies=["scratch"],
        config=config,
        augment=training.resolve_augment(args["augment"], data_source, config.seed),
        output_dir=result.run_dir / "baseline",
        verbose=verbose,  # its epochs show: minutes of silence would look like a hang
        report=False,  # a score beside the run, not a run to inspect
    ).rows[0]
    pixels = pixel_baseline(data)
    record = {
        "test_images": int(sum(data.counts["test"].values())),
        "transferred": {
            "accuracy": float(result.metrics["accuracy"]),
            "wall_seconds": round(seconds, 2),
            "weights": str(args["weights"]),
            "strategy": args["strategy"],
        },
        "scratch": {
            "accuracy": scratch.accuracy,
            "wall_seconds": scratch.wall_seconds,
            "epochs": scratch.epochs,
        },
        "pixels": pixels,
    }
    (result.run_dir / BASELINES_FILE).write_text(json.dumps(record, indent=2))
    if verbose:
        print(baselines_text(record))
    return result


def baselines_text(record: dict[str, Any]) -> str:
    """The closing table of ``train_with_baselines``."""
    t, s, p = record["transferred"], record["scratch"], record["pixels"]
    rows = [
        (f"transferred ({t['weights']}, {t['strategy']})", t["accuracy"], t["wall_seconds"]),
        (
            f"same network from scratch ({s['epochs']} epoch{'' if s['epochs'] == 1 else 's'})",
            s["accuracy"],
            s["wall_seconds"],
        ),
        (f"logistic regression on {p['pixels']} pixels", p["accuracy"], p["wall_seconds"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"Test accuracy on the same {record['test_images']} held-out images, and wall time "
        "(transferred: with the source pre-training when it was not cached):"
    ]
    lines += [f"  {name:<{width}}  {100 * acc:5.1f} %  {sec:6.1f} s" for name, acc, sec in rows]
    return "\n".join(lines)
