"""The sweep's rows, the recommendation among them and its files (``sweep.json``, ``sweep.csv``,
``sweep.png``); ``tlkeras.workflows.sweep`` trains the rows.

Recommendation: the best validation accuracy is known only up to the sampling noise of a finite
validation set. ``noise`` is the binomial standard deviation ``sqrt(p (1 - p) / n_val)`` at the best
accuracy p (Laplace-smoothed, so a perfect score still has some noise); among the rows within
``noise_sigmas`` of the best, the one with the fewest trainable parameters wins (a frozen row
before a fine-tuned one; a later k before an earlier one).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlkeras.fitting import reports

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_PNG = "sweep.png"
DEFAULT_NOISE_SIGMAS = 1.0

FROZEN, FINE_TUNED, SCRATCH = "frozen", "fine_tuned", "scratch"
MODES = (FROZEN, FINE_TUNED, SCRATCH)
CSV_FIELDS = (
    "mode",
    "k",
    "first_trainable_block",
    "trainable_params",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "epochs_run",
    "seconds",
    "fast_path",
)


@dataclass(frozen=True)
class SweepRow:
    """One trained model of the sweep.

    Attributes:
        mode: ``"frozen"`` (blocks < k frozen), ``"fine_tuned"`` (then everything trained) or
            ``"scratch"`` (random init, everything trained; ``k`` is ``None``).
        k: the freeze point; ``num_blocks`` means the whole backbone stayed frozen.
        first_trainable_block: the name of block k (``"-"`` when none trains).
        trainable_params: parameters the last phase trained.
        val_accuracy, val_loss: on the validation split, with the best-validation-loss weights.
        test_accuracy: on the test split (``None`` without one); not used to choose.
        epochs_run: epochs of the last phase (early stopping may end it sooner).
        seconds: wall time of this row (feature caching included).
        fast_path: the ``tlkeras.fitting.frozen`` mode that ran (``"full_model"``: plain ``fit``).
    """

    mode: str
    k: int | None
    first_trainable_block: str
    trainable_params: int
    val_accuracy: float
    val_loss: float
    test_accuracy: float | None
    epochs_run: int
    seconds: float
    fast_path: str


@dataclass(frozen=True)
class SweepResult:
    """The sweep's rows, the recommendation and where the files went."""

    rows: tuple[SweepRow, ...]
    recommended: SweepRow
    best: SweepRow
    noise: float
    noise_sigmas: float
    num_validation: int
    num_blocks: int
    block_names: tuple[str, ...]
    backbone: str
    backbone_kwargs: dict[str, Any]
    weights: str | None
    image_size: tuple[int, int]
    settings: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def scratch(self) -> SweepRow | None:
        return next((r for r in self.rows if r.mode == SCRATCH), None)

    def curve(self, mode: str) -> list[SweepRow]:
        return sorted((r for r in self.rows if r.mode == mode), key=lambda r: r.k)

    def table(self) -> str:
        header = (
            f"{'mode':<11}{'k':>4}  {'first trainable':<16}{'trainable':>11}{'val acc':>9}"
            f"{'val loss':>10}{'test acc':>10}{'epochs':>8}{'sec':>7}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            test = "-" if r.test_accuracy is None else f"{r.test_accuracy:.3f}"
            mark = "  <- recommended" if r is self.recommended else ""
            lines.append(
                f"{r.mode:<11}{'-' if r.k is None else r.k:>4}  {r.first_trainable_block:<16}"
                f"{r.trainable_params:>11,}{r.val_accuracy:>9.3f}{r.val_loss:>10.4f}{test:>10}"
                f"{r.epochs_run:>8}{r.seconds:>7.1f}{mark}"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        r, b = self.recommended, self.best
        trains = (
            "whole backbone frozen"
            if r.k == self.num_blocks
            else f"blocks from {r.first_trainable_block} on train"
        )
        if r.mode == FINE_TUNED:
            trains += ", then everything fine-tuned"
        return "\n".join(
            [
                self.table(),
                f"best: {b.mode} k={b.k} val accuracy {b.val_accuracy:.3f}; noise (binomial std "
                f"over {self.num_validation} validation images) {self.noise:.3f}",
                f"recommended: {r.mode} k={r.k} ({trains}), val "
                f"accuracy {r.val_accuracy:.3f}, {r.trainable_params:,} trainable params: the "
                f"fewest among rows within {self.noise_sigmas:g} x noise of the best",
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["recommended"] = dataclasses.asdict(self.recommended)
        out["best"] = dataclasses.asdict(self.best)
        out["rows"] = [dataclasses.asdict(r) for r in self.rows]
        out["image_size"] = list(self.image_size)
        out["block_names"] = list(self.block_names)
        return out


def binomial_noise(accuracy: float, n: int) -> float:
    """Standard deviation of an accuracy measured on ``n`` examples (Laplace-smoothed p)."""
    p = (accuracy * n + 1) / (n + 2)
    return math.sqrt(p * (1 - p) / max(n, 1))


def recommend(
    rows: Sequence[SweepRow], num_validation: int, noise_sigmas: float = DEFAULT_NOISE_SIGMAS
) -> tuple[SweepRow, SweepRow, float]:
    """``(recommended, best, noise)`` among the transferred rows (scratch is only the baseline)."""
    candidates = [r for r in rows if r.mode != SCRATCH]
    if not candidates:
        raise ValueError("recommend: expected at least one frozen or fine-tuned row, received none")
    best = max(candidates, key=lambda r: (r.val_accuracy, -r.val_loss))
    noise = binomial_noise(best.val_accuracy, num_validation)
    close = [r for r in candidates if r.val_accuracy >= best.val_accuracy - noise_sigmas * noise]
    chosen = min(close, key=lambda r: (r.trainable_params, -r.val_accuracy, -(r.k or 0)))
    return chosen, best, noise


# --------------------------------------------------------------------------------------------
# Files


def write(result: SweepResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``sweep.json``, ``sweep.csv`` and ``sweep.png`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / SWEEP_JSON, "csv": out / SWEEP_CSV, "png": out / SWEEP_PNG}
    paths["json"].write_text(json.dumps(reports.to_jsonable(result.to_dict()), indent=2))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: getattr(row, k) for k in CSV_FIELDS})
    plot(result, paths["png"])
    return paths


def plot(result: SweepResult, path: str | Path) -> Path:
    """Validation accuracy against k: frozen and fine-tuned curves, the scratch baseline as a line,
    the recommendation circled and the noise band around the best."""
    plt = reports.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {
        FROZEN: ("o-", "tab:blue", "frozen blocks < k"),
        FINE_TUNED: ("s--", "tab:orange", "then fine-tuned"),
    }
    for mode, (marker, color, label) in styles.items():
        curve = result.curve(mode)
        if curve:
            ax.plot(
                [r.k for r in curve],
                [r.val_accuracy for r in curve],
                marker,
                color=color,
                label=label,
            )
    scratch = result.scratch
    if scratch is not None:
        ax.axhline(scratch.val_accuracy, color="tab:gray", linestyle=":", label="from scratch")
    best = result.best.val_accuracy
    ax.axhspan(
        best - result.noise_sigmas * result.noise,
        best,
        color="tab:green",
        alpha=0.12,
        label=f"within {result.noise_sigmas:g}x noise of best",
    )
    rec = result.recommended
    ax.plot(
        [rec.k],
        [rec.val_accuracy],
        "o",
        markersize=14,
        markerfacecolor="none",
        markeredgecolor="tab:green",
        markeredgewidth=2,
        label=f"recommended (k={rec.k})",
    )
    ks = sorted({r.k for r in result.rows if r.k is not None})
    ax.set_xticks(ks)
    ax.set_xticklabels(
        [f"{k}\n{result.block_names[k] if k < result.num_blocks else 'all'}" for k in ks],
        fontsize=8,
    )
    ax.set_xlabel("k: first trainable block (blocks < k frozen)")
    ax.set_ylabel(f"validation accuracy (n={result.num_validation})")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{result.backbone} transferability curve")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
