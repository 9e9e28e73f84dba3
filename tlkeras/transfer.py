"""The offline transfer story: pre-train a backbone on a source task, transfer it, compare strategies.

``pretrained_weights("digits:0-4")`` trains a small backbone from scratch on the digits 0–4 (real
scikit-learn scans, no download), saves the backbone's weights under ``$KERAS_HOME/tlkeras/pretrained``
keyed by its arguments, and reuses them on later calls. ``build_model(..., weights=path)`` then
transfers them. ``"source:digits:0-4"`` is the same thing as a ``weights`` string
(``resolve_weights``), the default of ``scripts/train.py``.

``compare_strategies`` trains each strategy on the same data and split and returns one table
(strategy, trainable params, wall time, test accuracy); ``transfer_story`` runs it on digits 5–9 with
the backbone pre-trained on 0–4, so the scratch row shows what transfer bought.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

SOURCE_PREFIX = "source:"
DEFAULT_SOURCE = "digits:0-4"
DEFAULT_TARGET = "digits:5-9"
DEFAULT_BACKBONE = "MobileNet"
DEFAULT_BACKBONE_KWARGS: dict[str, Any] = {"alpha": 0.25}
DEFAULT_IMAGE_SIZE = 32  # digits are 8x8 scans: the source task trains at MobileNet's minimum size
DEFAULT_PRETRAIN_EPOCHS = 10
DEFAULT_LEARNING_RATE = 2e-3
DEFAULT_BATCH_SIZE = 32
STRATEGIES = ("scratch", "feature_extraction", "partial", "full")
CACHE_SUBDIR = os.path.join("tlkeras", "pretrained")
# A short from-scratch run moves the weights fast; with Keras's default BatchNormalization momentum
# (0.99) the moving statistics lag behind and inference-mode accuracy collapses to chance.
SCRATCH_BN_MOMENTUM = 0.9
# Bump when the pre-training recipe changes, so stale cached weights are not reused.
_RECIPE_VERSION = 2


def _scratch_batchnorm(model: keras.Model, momentum: float = SCRATCH_BN_MOMENTUM) -> None:
    """Let BatchNormalization statistics keep up with a short from-scratch training run."""
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def cache_root() -> Path:
    """``$KERAS_HOME/tlkeras/pretrained`` (read at call time, like ``keras.utils.get_file``)."""
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        base = base if os.access(base, os.W_OK) else tempfile.gettempdir()
        home = os.path.join(base, ".keras")
    return Path(home) / CACHE_SUBDIR


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, received {value!r}")
    return value


def _check_source(source: Any) -> str:
    from tlkeras.data import DIGITS

    if not isinstance(source, str) or not re.fullmatch(rf"{DIGITS}(:\d-\d)?", source.strip()):
        raise ValueError(
            f"source: expected an embedded source task such as 'digits' or 'digits:0-4', "
            f"received {source!r}"
        )
    return source.strip()


def _cache_key(**fields: Any) -> str:
    text = json.dumps({**fields, "recipe": _RECIPE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pretrained_weights(
    source: str = DEFAULT_SOURCE,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    epochs: int | None = None,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    verbose: int = 0,
) -> Path:
    """A backbone pre-trained from scratch on ``source``, as a ``.weights.h5`` file (cached).

    The file lives in ``cache_dir`` (default ``$KERAS_HOME/tlkeras/pretrained``) under a name keyed
    by every argument, so a second call with the same arguments returns at once. Next to it, a
    ``.json`` records the recipe and the source validation accuracy. Convolutional weights do not
    depend on the input size, so the weights transfer to models of any input size.

    Args:
        source: an embedded task, ``"digits"`` or ``"digits:A-B"``.
        backbone: a ``tlkeras.backbone_names()`` entry.
        backbone_kwargs: constructor arguments (``None``: ``DEFAULT_BACKBONE_KWARGS`` for the
            default backbone, else none).
        image_size: square training size; raised to the backbone's minimum.
        epochs: pre-training epochs (``None``: ``DEFAULT_PRETRAIN_EPOCHS``).
        seed: seeds Keras (Python, NumPy, TF) and the data split before training.
        cache_dir: where to keep the weights.
        verbose: Keras verbosity of the pre-training fit.

    Returns:
        The path of the backbone weights, for ``tlkeras.build_model(..., weights=path)``.
    """
    from tlkeras.backbones import get_backbone
    from tlkeras.data import load
    from tlkeras.model import HeadConfig, build_model

    source = _check_source(source)
    spec = get_backbone(backbone)
    if backbone_kwargs is None:
        backbone_kwargs = dict(DEFAULT_BACKBONE_KWARGS) if spec.name == DEFAULT_BACKBONE else {}
    if not isinstance(backbone_kwargs, dict):
        raise TypeError(
            f"backbone_kwargs: expected a dict, received {type(backbone_kwargs).__name__}"
        )
    size = max(_check_positive_int("image_size", image_size), spec.min_size)
    epochs = _check_positive_int("epochs", DEFAULT_PRETRAIN_EPOCHS if epochs is None else epochs)
    directory = Path(cache_dir) if cache_dir is not None else cache_root()
    key = _cache_key(
        source=source,
        backbone=spec.name,
        kwargs=backbone_kwargs,
        size=size,
        epochs=epochs,
        seed=seed,
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source).strip("-")
    path = directory / f"{spec.name}_{slug}_{size}px_{key}.weights.h5"
    if path.is_file():
        return path

    directory.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    data = load(
        source,
        image_size=(size, size),
        batch_size=DEFAULT_BATCH_SIZE,
        seed=seed,
        validation_split=0.1,
        test_split=0.0,
    )
    model = build_model(
        spec.name,
        len(data.class_names),
        strategy="scratch",
        weights=None,
        input_shape=(size, size, 3),
        backbone_kwargs=backbone_kwargs,
        head=HeadConfig(dropout=0.1),
    )
    _scratch_batchnorm(model)
    model.compile(
        optimizer=keras.optimizers.Adam(DEFAULT_LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    history = model.fit(data.train, validation_data=data.validation, epochs=epochs, verbose=verbose)
    seconds = time.perf_counter() - started
    # Write next to the target and rename: a crash or a concurrent run never leaves half a file.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.weights.h5")
    model.get_layer("backbone").save_weights(tmp)
    os.replace(tmp, path)
    record = {
        "source": source,
        "backbone": spec.name,
        "backbone_kwargs": backbone_kwargs,
        "image_size": size,
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(seconds, 2),
        "source_val_accuracy": float(history.history["val_accuracy"][-1]),
        "class_names": data.class_names,
    }
    path.with_suffix("").with_suffix(".json").write_text(json.dumps(record, indent=2))
    return path


def pretrained_record(path: str | Path) -> dict[str, Any]:
    """The JSON record written next to ``pretrained_weights``'s file (empty if missing)."""
    record = Path(path).with_suffix("").with_suffix(".json")
    return json.loads(record.read_text()) if record.is_file() else {}


def resolve_weights(
    weights: str | os.PathLike | None,
    backbone: str = DEFAULT_BACKBONE,
    backbone_kwargs: dict[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
) -> str | None:
    """Turn a ``weights`` value or flag text into what ``tlkeras.build_model`` takes.

    ``None``/``"none"`` → ``None``; ``"imagenet"`` → ``"imagenet"``; ``"source:TASK"`` (e.g.
    ``"source:digits:0-4"``) → the path of a backbone pre-trained on TASK (``pretrained_weights``,
    at ``DEFAULT_IMAGE_SIZE``; the weights fit any input size); any other string → an existing file.
    """
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"weights: expected 'imagenet', None, 'source:TASK' or a file path, received "
            f"{type(weights).__name__}"
        )
    text = os.fspath(weights).strip()
    if text.lower() in ("", "none", "null", "random"):
        return None
    if text.lower() == "imagenet":
        return "imagenet"
    if text.startswith(SOURCE_PREFIX):
        if input_shape is not None and (len(input_shape) != 3 or input_shape[-1] != 3):
            raise ValueError(
                f"input_shape: expected (height, width, 3) for transferred weights, received "
                f"{tuple(input_shape)}"
            )
        return str(pretrained_weights(text[len(SOURCE_PREFIX) :], backbone, backbone_kwargs))
    if not Path(text).expanduser().is_file():
        raise FileNotFoundError(
            f"weights: expected 'imagenet', None, 'source:TASK' or an existing weights file, "
            f"received {text!r} (no such file)"
        )
    return str(Path(text).expanduser())


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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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


def _default_fine_tune_at(model: keras.Model) -> int:
    from tlkeras.blocks import blocks

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
) -> Comparison:
    """Train each strategy on the same ``data`` (one ``tlkeras.data.ImageData``, so one split).

    ``scratch`` uses random init (``weights`` is ignored for it); the other strategies start from
    ``weights`` (anything ``resolve_weights`` takes). Each run goes through
    ``tlkeras.training.fit`` in ``output_dir/<strategy>`` (a temporary directory when ``None``),
    and is scored on ``data.test``.

    Args:
        data: a ``tlkeras.data.ImageData``.
        fine_tune_at: the ``partial`` boundary (default: half the backbone's blocks).
        config: a ``tlkeras.training.TrainConfig`` shared by every strategy.
        augment: an ``AugmentConfig`` or ``None``.

    Returns:
        A ``Comparison``; ``.save(dir)`` writes the JSON and the plot.
    """
    from tlkeras import training
    from tlkeras.model import build_model

    unknown = [s for s in strategies if s not in STRATEGIES]
    if not strategies or unknown:
        raise ValueError(
            f"strategies: expected a non-empty subset of {STRATEGIES}, received {list(strategies)}"
        )
    if data.test is None:
        raise ValueError("data: expected a test split to score every strategy on, received none")
    backbone_kwargs = dict(backbone_kwargs or {})
    image_size = tuple(data.train.element_spec[0].shape[1:3])
    input_shape = (*image_size, 3)
    resolved = resolve_weights(weights, backbone, backbone_kwargs, input_shape)
    config = config or training.TrainConfig()
    root = (
        Path(output_dir)
        if output_dir is not None
        else Path(tempfile.mkdtemp(prefix="tlkeras_compare_"))
    )
    rows = []
    for strategy in strategies:
        init = None if strategy == "scratch" else resolved
        model = build_model(
            backbone,
            len(data.class_names),
            strategy="feature_extraction" if strategy == "partial" else strategy,
            weights=init,
            input_shape=input_shape,
            backbone_kwargs=backbone_kwargs,
            augment=augment,
        )
        if strategy == "scratch":
            _scratch_batchnorm(model)
        k = (fine_tune_at or _default_fine_tune_at(model)) if strategy == "partial" else None
        keras.utils.set_random_seed(config.seed)
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
        )
        seconds = time.perf_counter() - started
        rows.append(
            ComparisonRow(
                strategy=strategy,
                trainable_params=sum(int(w.numpy().size) for w in result.model.trainable_weights),
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
) -> Comparison:
    """Pre-train on ``source``, then train ``target`` with every strategy: what did transfer buy?

    Returns the ``compare_strategies`` table with the source task's record in ``extra``.
    """
    from tlkeras.backbones import get_backbone
    from tlkeras.data import load
    from tlkeras.training import TrainConfig

    spec = get_backbone(backbone)
    if backbone_kwargs is None:
        backbone_kwargs = dict(DEFAULT_BACKBONE_KWARGS) if spec.name == DEFAULT_BACKBONE else {}
    config = config or TrainConfig()
    path = pretrained_weights(
        source, spec.name, backbone_kwargs, image_size, pretrain_epochs, seed=config.seed
    )
    size = max(image_size, spec.min_size)
    data = load(target, image_size=(size, size), batch_size=config.batch_size, seed=config.seed)
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
    )
    return dataclasses.replace(table, extra={**table.extra, "target": target})
