"""Shared pieces of the benchmark: settings, the one fixed split, and the worker protocol.

Every contender runs in its own Python process (``python benchmarks/run.py --worker=NAME``) so one
cannot warm the other's caches or inflate its memory; a worker writes one JSON result holding its
timings, accuracies and peak resident memory (``ru_maxrss``).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "hymenoptera" / "train"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
SPLITS = ("train", "val", "test")
# image_dataset_from_directory's extensions: the peer sees exactly the files tlkeras sees.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclass(frozen=True)
class BenchConfig:
    """What both contenders share: data split, backbone, image size, epoch budget, batch size.

    Attributes:
        data: folder with one subfolder per class (split here, once, for everyone).
        weights: ``MobileNet`` weights file (``None``: random init, for smoke tests only).
        image_size: square side in pixels.
        alpha: MobileNet width multiplier.
        batch_size: examples per batch.
        epochs: frozen-phase epochs (head warm-up).
        fine_tune_epochs: fine-tuning epochs after unfreezing.
        patience: EarlyStopping patience on validation loss (both contenders, best weights restored).
        validation_split: fraction of the data for early stopping.
        test_split: fraction of the data held out for the reported accuracy.
        split_seed: seeds the one stratified split (training seeds vary separately).
    """

    data: str = str(DEFAULT_DATA)
    weights: str | None = str(DEFAULT_WEIGHTS)
    image_size: int = 224
    alpha: float = 0.25
    batch_size: int = 32
    epochs: int = 10
    fine_tune_epochs: int = 10
    patience: int = 3
    validation_split: float = 0.2
    test_split: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "epochs", "fine_tune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, received {value!r}")
        if (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, int)
            or self.patience < 0
        ):
            raise ValueError(f"patience: expected an int >= 0, received {self.patience!r}")
        for name in ("validation_split", "test_split"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}: expected a fraction in (0, 1), received {value!r}")
        if self.validation_split + self.test_split >= 1.0:
            raise ValueError(
                "validation_split + test_split: expected a sum below 1, received "
                f"{self.validation_split} + {self.test_split}"
            )
        if not Path(self.data).is_dir():
            raise ValueError(f"data: expected a folder of class folders, received {self.data!r}")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"weights: expected a weights file or None, received {self.weights!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        return cls(**d)


def make_split(config: BenchConfig, out_dir: str | Path) -> dict[str, dict[str, int]]:
    """Copy ``config.data`` into ``out_dir/{train,val,test}/<class>/`` with one stratified split.

    Both contenders read these folders (the peer with ``image_dataset_from_directory``, tlkeras with
    ``tlkeras.data.load``, which recognises the ``train/val/test`` layout), so they train, early-stop
    and are scored on the very same files. Returns ``split -> class -> count``.
    """
    from sklearn.model_selection import train_test_split

    classes, files, labels = _listing(config.data)
    rest, test = train_test_split(
        list(range(len(files))),
        test_size=config.test_split,
        random_state=config.split_seed,
        stratify=labels,
    )
    train, val = train_test_split(
        rest,
        test_size=config.validation_split / (1.0 - config.test_split),
        random_state=config.split_seed,
        stratify=[labels[i] for i in rest],
    )
    splits = dict(zip(SPLITS, (train, val, test), strict=True))
    return _copy_splits(classes, files, labels, splits, out_dir)


def _listing(data: str | Path) -> tuple[list[str], list[Path], list[int]]:
    """``(class names, image files, labels)`` of a folder with one subfolder per class."""
    root = Path(data)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
                labels.append(label)
    if len(classes) < 2 or not files:
        raise ValueError(
            f"data: expected at least 2 class folders of images, received {classes} in {root}"
        )
    return classes, files, labels


def make_holdout(
    data: str | Path, test_split: float, seed: int, out_dir: str | Path
) -> dict[str, dict[str, int]]:
    """Copy ``data`` into ``out_dir/{pool,test}/<class>/``: one stratified held-out test part.

    Each contender gets ``pool`` and splits off its own validation data, as a user would; ``test``
    is only for scoring the exports. Returns ``split -> class -> count``.
    """
    from sklearn.model_selection import train_test_split

    classes, files, labels = _listing(data)
    pool, test = train_test_split(
        list(range(len(files))), test_size=test_split, random_state=seed, stratify=labels
    )
    return _copy_splits(classes, files, labels, {"pool": pool, "test": test}, out_dir)


def _copy_splits(
    classes: list[str],
    files: list[Path],
    labels: list[int],
    splits: dict[str, list[int]],
    out_dir: str | Path,
) -> dict[str, dict[str, int]]:
    """Copy each split's files into ``out_dir/<split>/<class>/``; ``split -> class -> count``."""
    out_dir = Path(out_dir)
    counts: dict[str, dict[str, int]] = {}
    for split, indices in splits.items():
        counts[split] = dict.fromkeys(classes, 0)
        for name in classes:
            (out_dir / split / name).mkdir(parents=True, exist_ok=True)
        for i in indices:
            name = classes[labels[i]]
            shutil.copyfile(files[i], out_dir / split / name / files[i].name)
            counts[split][name] += 1
    return counts


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    result = {**result, "peak_rss_mib": round(peak_rss_mib(), 1)}
    Path(path).write_text(json.dumps(result, indent=2, default=str))


def machine() -> dict[str, Any]:
    """The machine the numbers were taken on."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} begin -->", f"<!-- section:{name} end -->"


def write_section(path: str | Path, name: str, text: str) -> None:
    """Put ``text`` into ``path`` as the named section: replaced in place, or appended."""
    begin, end = _markers(name)
    block = f"{begin}\n{text.strip()}\n{end}\n"
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) + 1 :]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block
    path.write_text(new)


def kept_sections(path: str | Path) -> str:
    """The named sections other benchmarks wrote into ``path`` (for a script rewriting the rest)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    out, start = [], 0
    while (i := text.find("<!-- section:", start)) >= 0:
        name = text[i + len("<!-- section:") :].split(" ", 1)[0]
        end = _markers(name)[1]
        j = text.find(end, i)
        if j < 0:
            break
        out.append(text[i : j + len(end)] + "\n")
        start = j + len(end)
    return "\n".join(out)


def timed(command: list[str], log: Path) -> float:
    """Run ``command`` from the repository root, output to ``log``; its wall seconds (exits on failure)."""
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"{command[:3]} failed ({done.returncode}):\n" + "\n".join(tail))
    return seconds


def load_test_images(test_dir: str, size: int) -> tuple[Any, Any, list[str]]:
    import keras
    import numpy as np

    ds = keras.utils.image_dataset_from_directory(
        test_dir, image_size=(size, size), batch_size=64, shuffle=False, verbose=False
    )
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys), list(ds.class_names)


def score_exports(job: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy of each export's float signature (raw 0-255 pixels) on ``job["test"]``.

    ``job``: ``test`` (a class-folder tree), ``image_size``, ``exports`` (name -> SavedModel dir).
    tlkeras exports are read in their own class order (``labels.txt``); others as one logit.
    """
    import numpy as np
    import tensorflow as tf

    x, y, classes = load_test_images(job["test"], job["image_size"])
    out = {}
    for name, path in job["exports"].items():
        loaded = tf.saved_model.load(path)
        if "serving_float" in loaded.signatures:  # tlkeras: probabilities, its own class order
            outputs = loaded.signatures["serving_float"](images=tf.constant(x))
            probs = np.asarray(outputs["probabilities"])
            labels_file = Path(path) / "assets.extra" / "labels.txt"
            names = labels_file.read_text().splitlines() if labels_file.is_file() else classes
            index = [names.index(c) for c in classes]  # test class i -> export column
            if probs.shape[1] == 1:
                predicted = (probs[:, 0] > 0.5).astype(int)
                predicted = np.array([classes.index(names[p]) for p in predicted])
            else:
                predicted = np.argmax(probs[:, index], axis=1)
        else:  # the recipe: one logit (two classes) or one per class, in folder order
            logits = np.asarray(loaded.serve(tf.constant(x)))
            predicted = (logits[:, 0] > 0).astype(int) if logits.shape[1] == 1 else logits.argmax(1)
        out[name] = float(np.mean(predicted == y))
    return {"accuracy": out, "test_images": int(len(y))}
