"""The run directory: every file name in it, its state file, and the per-phase history logs.

One run directory (``run_dir``) holds everything needed to resume or audit a run::

    run_state.json              configuration fingerprint, status (running/done/failed), per-phase progress
    backup/phase{N}/            Keras BackupAndRestore (the latest and the previous epoch)
    phase{N}.weights.h5         the weights at the end of each phase (phase N+1 starts from them)
    model.keras                 the best model so far by validation loss (the final model; after a
                                refit on train + validation, the refit model)
    model.keras.json            the monitored value of model.keras (a resumed phase must beat it)
    baselines.json              scratch and pixel baselines on the same split (train_with_baselines)
    history_phase{N}.csv        per epoch, as written; history.json / history.csv merged
    history.png, confusion.png  curves with the phase boundary; the test confusion matrix
    metrics.json                test-split metrics, data counts, skipped files, phases
    tb/phase{N}/                TensorBoard logs

Training, reports, export and the distributed runner ask this module for these names. A finished run
directory is never overwritten unless asked, and a directory that is not a tlkeras run directory is
never cleared.
A directory holding an unfinished run with a *different* configuration raises ``ValueError`` instead
of mixing two runs; a corrupted latest backup falls back to the previous one, then to a clean phase
restart.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RUN_STATE = "run_state.json"
BEST_MODEL = "model.keras"
BACKUP_DIR = "backup"
TENSORBOARD_DIR = "tb"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
HISTORY_PNG = "history.png"
CONFUSION_PNG = "confusion.png"
METRICS_JSON = "metrics.json"


def phase_weights(phase: int) -> str:
    return f"phase{phase}.weights.h5"


def phase_csv(phase: int) -> str:
    return f"history_phase{phase}.csv"


def phase_backup(phase: int) -> str:
    return os.path.join(BACKUP_DIR, f"phase{phase}")


def phase_tensorboard(phase: int) -> str:
    return os.path.join(TENSORBOARD_DIR, f"phase{phase}")


def to_jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented strict JSON atomically (temp file + ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_STATE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "corrupt"}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_json(state, run_dir / RUN_STATE)


def _clear_run_dir(run_dir: Path) -> None:
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_run_dir(
    run_dir: str | Path, fingerprint: dict[str, Any], *, overwrite: bool = False
) -> tuple[str, dict[str, Any] | None]:
    """What :func:`prepare_run_dir` would do with ``run_dir``, without writing anything.

    Returns ``(action, state)``: action ``"new"``, ``"overwrite"``, ``"restart"`` (a failed or
    corrupt run) or ``"resume"``. Every worker of a multi-worker run checks before the chief
    writes, so they all raise (or none does).

    Raises:
        FileExistsError: ``run_dir`` holds a finished run (and ``overwrite`` is False), or is a
            non-empty directory that is not a tlkeras run directory.
        ValueError: ``run_dir`` holds an unfinished run with a different configuration.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run_dir: expected a directory, received the file {run_dir}")
    state = read_state(run_dir) if run_dir.is_dir() else None
    if state is None:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise FileExistsError(
                f"run_dir: expected an empty or tlkeras run directory, received {run_dir} holding "
                "other files; choose another output directory (it is never cleared)"
            )
        return "new", None
    if overwrite:
        return "overwrite", state
    if state.get("status") == "done":
        raise FileExistsError(
            f"run_dir: {run_dir} holds a finished run (see {run_dir / METRICS_JSON}); "
            "expected a new output directory, or overwrite=True (--overwrite) to replace it"
        )
    if state.get("status") in ("failed", "corrupt"):
        return "restart", state
    if state.get("fingerprint") != fingerprint:
        changed = sorted(
            k
            for k in set(fingerprint) | set(state.get("fingerprint", {}))
            if fingerprint.get(k) != state.get("fingerprint", {}).get(k)
        )
        raise ValueError(
            f"run_dir: {run_dir} holds an unfinished run with different settings ({changed}); "
            "expected the same settings to resume it, another output directory, or "
            "overwrite=True (--overwrite)"
        )
    return "resume", state


def normal_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    # Compare in JSON form: the stored fingerprint has lists where the new one has tuples.
    return json.loads(json.dumps(to_jsonable(fingerprint), sort_keys=True))


def prepare_run_dir(
    run_dir: str | Path, fingerprint: dict[str, Any], *, overwrite: bool = False
) -> dict[str, Any]:
    """Create, resume or (with ``overwrite``) clear ``run_dir``; return its state.

    Raises: as :func:`check_run_dir`.
    """
    run_dir = Path(run_dir)
    fingerprint = normal_fingerprint(fingerprint)
    action, state = check_run_dir(run_dir, fingerprint, overwrite=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    if action == "overwrite":
        print(f"Overwriting the run in {run_dir}")
        _clear_run_dir(run_dir)
    elif action == "restart":
        print(f"Previous run in {run_dir} {state.get('status')}; starting afresh")
        _clear_run_dir(run_dir)
    if action == "resume":
        state["resumes"] = int(state.get("resumes", 0)) + 1
        print(f"Resuming the unfinished run in {run_dir}")
    else:
        state = {"status": "running", "fingerprint": fingerprint, "phases": {}, "resumes": 0}
    write_state(run_dir, state)
    return state


def read_phase_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a phase's CSV log, one per epoch (the last row wins when a resume repeated one)."""
    if not path.exists():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                parsed = {k: float(v) for k, v in row.items() if k and v not in (None, "")}
            except ValueError:
                continue  # a line cut short by a kill
            if "epoch" in parsed:
                by_epoch[int(parsed["epoch"])] = parsed
    return [by_epoch[e] for e in sorted(by_epoch)]


def merged_history(run_dir: str | Path, num_phases: int) -> tuple[dict[str, list], int | None]:
    """Merge ``history_phase{N}.csv`` into one column dict with ``epoch`` and ``phase`` columns."""
    run_dir = Path(run_dir)
    rows: list[dict[str, Any]] = []
    boundary = None
    for phase in range(1, num_phases + 1):
        phase_rows = read_phase_csv(run_dir / phase_csv(phase))
        if phase == 2 and phase_rows:
            boundary = int(phase_rows[0]["epoch"])
        rows += [{**r, "phase": phase} for r in phase_rows]
    keys: list[str] = ["epoch", "phase"]
    for r in rows:
        keys += [k for k in r if k not in keys]
    history = {k: [r.get(k) for r in rows] for k in keys}
    if "epoch" in history:
        history["epoch"] = [int(e) for e in history["epoch"]]
    return history, boundary


def kept_weights(
    run_dir: str | Path, phase_names: Sequence[str], monitor: str
) -> dict[str, Any] | None:
    """Which phase and epoch the final model's weights come from, and whether fine-tuning lost.

    The best-model checkpoint saves on strict improvement of ``monitor`` across every phase, so the
    kept epoch is the first with the lowest value in the phase logs. ``None`` without logs. When a
    phase after the kept one exists (fine-tuning never beat the head), ``"note"`` says so: the run
    returns the earlier phase's model, and its summary must not read as a fine-tuned one.
    """
    run_dir = Path(run_dir)
    best: dict[int, tuple[float, int]] = {}
    for number in range(1, len(phase_names) + 1):
        for row in read_phase_csv(run_dir / phase_csv(number)):
            value = row.get(monitor)
            if value is not None and math.isfinite(value):
                if number not in best or value < best[number][0]:
                    best[number] = (value, int(row["epoch"]) + 1)
    if not best:
        return None
    phase = min(best, key=lambda n: (best[n][0], n))
    value, epoch = best[phase]
    out: dict[str, Any] = {
        "phase": phase,
        "name": phase_names[phase - 1],
        "epoch": epoch,
        "monitor": monitor,
        "value": value,
        "best_by_phase": {str(n): v for n, (v, _) in best.items()},
    }
    later = [n for n in best if n > phase]
    if later:
        their_best = min(best[n][0] for n in later)
        names = ", ".join(f"{n} ({phase_names[n - 1]})" for n in later)
        out["note"] = (
            f"fine-tuning did not improve {monitor}: phase {names} reached {their_best:.4f} at "
            f"best, phase {phase} ({phase_names[phase - 1]}) {value:.4f}; the model keeps phase "
            f"{phase}'s weights"
        )
    return out


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------
