"""Test-time augmentation (TTA): average the probabilities over a few views of each image.

The views of an image ``[H, W, 3]`` (``TTAConfig``), in this order:

- the image itself;
- ``flip``: its mirror image (left ↔ right);
- ``crops=5``: its four corner crops and its centre crop, each ``crop_fraction`` of the height and
  width (0.875 by default), resized back to ``H × W`` (bilinear). Crops are not mirrored.

So ``"flip"`` is 2 views, ``"crops"`` 6 and ``"flip,crops"`` 7; each costs one more forward pass.
The served probabilities are the mean over the views of each view's probabilities (after the
export's temperature, ``tlkeras.analysis.calibration``, when it has one); top-k classes and scores are taken
from that mean. A model that cannot tell an image from its mirror (a global average pool straight
after the input, say) gets exactly what it got without TTA.

Three places run it, with the same views:

- in memory: ``average_probabilities(model_or_fn, pixels, config)``, a Keras model whose outputs
  are probabilities (tlkeras's softmax/sigmoid heads) or any ``pixels -> probabilities`` callable;
- client side on an export: ``TTAModel(load_exported(path), config)`` runs the export's float
  signature on each view (``scripts/evaluate.py --tta``, ``scripts/predict.py --tta``);
- in the export's graph: ``tlkeras.export(..., tta=config)`` makes both signatures average over the
  views (``scripts/export.py --tta``), recorded in ``metadata.json`` under ``"tta"``; such an
  export refuses client-side TTA on top (the views would be averaged twice).

Strings (the scripts' ``--tta``): ``parse("none")`` is ``None`` (no TTA); otherwise a comma-separated
list of ``flip``, ``crops`` (or ``crops=5``) and ``crop_fraction=F``, e.g. ``"flip,crops"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import keras  # noqa: E402  isort: skip
import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras import checks  # noqa: E402
from tlkeras.data.decoding import DEFAULT_TOP_K, reference_decode  # noqa: E402

CROP_COUNTS = (0, 5)
DEFAULT_CROP_FRACTION = 0.875
_CROP_NAMES = ("crop_top_left", "crop_top_right", "crop_bottom_left", "crop_bottom_right")


@dataclass(frozen=True)
class TTAConfig:
    """Which views test-time augmentation averages over (see the module docstring)."""

    flip: bool = True
    crops: int = 0
    crop_fraction: float = DEFAULT_CROP_FRACTION

    def __post_init__(self) -> None:
        checks.boolean("tta flip", self.flip)
        checks.choice("tta crops", self.crops, CROP_COUNTS, as_repr=True)
        checks.interval("tta crop_fraction", self.crop_fraction, 0.5, 1, high_open=True)
        if not self.flip and not self.crops:
            raise ValueError(
                "tta: expected at least one view besides the image (flip=True or crops=5), "
                "received neither; use None (or 'none') for no test-time augmentation"
            )

    @property
    def view_names(self) -> tuple[str, ...]:
        names = ["image"] + (["flip"] if self.flip else [])
        if self.crops:
            names += [*_CROP_NAMES, "crop_centre"]
        return tuple(names)

    @property
    def num_views(self) -> int:
        return len(self.view_names)

    def __str__(self) -> str:
        """The string ``parse`` reads back: ``flip``, ``flip,crops``, ``crops,crop_fraction=0.8``."""
        parts = (["flip"] if self.flip else []) + (["crops"] if self.crops else [])
        if self.crops and self.crop_fraction != DEFAULT_CROP_FRACTION:
            parts.append(f"crop_fraction={self.crop_fraction:g}")
        return ",".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": str(self),
            "flip": self.flip,
            "crops": self.crops,
            "crop_fraction": self.crop_fraction,
            "views": list(self.view_names),
        }

    def views(self, images: Any) -> list[tf.Tensor]:
        """The views of ``images`` (float32 ``[N, H, W, 3]``, H and W known), each of the same
        shape: TensorFlow ops, so this runs eagerly and inside a serving graph alike."""
        images = tf.convert_to_tensor(images, tf.float32)
        h, w = int(images.shape[1]), int(images.shape[2])
        out = [images]
        if self.flip:
            out.append(tf.reverse(images, axis=[2]))
        if self.crops:
            ch = max(1, round(h * self.crop_fraction))
            cw = max(1, round(w * self.crop_fraction))
            corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
            for y, x in [*corners, ((h - ch) // 2, (w - cw) // 2)]:
                crop = images[:, y : y + ch, x : x + cw, :]
                out.append(tf.image.resize(crop, (h, w), method="bilinear"))
        return out


def parse(text: str | None) -> TTAConfig | None:
    """A ``--tta`` string as a ``TTAConfig``; ``None`` for ``"none"`` (or empty / ``None``)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"tta: expected a string such as 'flip' or 'none', received {text!r}")
    tokens = [t.strip().lower() for t in text.split(",")]
    if tokens in (["none"], [""]):
        return None
    expected = (
        "expected 'none' or a comma-separated list of flip, crops (crops=0|5) and "
        "crop_fraction=F, e.g. 'flip' or 'flip,crops'"
    )
    options: dict[str, Any] = {"flip": False}
    seen: set[str] = set()
    for token in tokens:
        key, _, value = token.partition("=")
        if (
            key in seen
            or key not in ("flip", "crops", "crop_fraction")
            or (key == "flip" and value)
        ):
            what = "repeated" if key in seen else "unknown"
            raise ValueError(f"tta: {expected}; received {text!r} ({what} {token!r})")
        seen.add(key)
        try:
            if key == "flip":
                options["flip"] = True
            elif key == "crops":
                options["crops"] = int(value) if value else 5
            else:
                options["crop_fraction"] = float(value)
        except ValueError:
            raise ValueError(
                f"tta: {expected}; received {text!r} (bad value in {token!r})"
            ) from None
    return TTAConfig(**options)


def check(config: Any, name: str = "tta") -> TTAConfig | None:
    """``config`` as a ``TTAConfig`` or ``None``: a config, ``None`` or a ``parse`` string."""
    if config is None or isinstance(config, TTAConfig):
        return config
    if isinstance(config, str):
        return parse(config)
    raise ValueError(
        f"{name}: expected a TTAConfig, a string such as 'flip', or None, received {config!r}"
    )


# --------------------------------------------------------------------------------------------------
# In memory: a Keras model or any pixels -> probabilities callable.


def average_probabilities(
    model_or_fn: Any, pixels: Any, config: TTAConfig | str | None, *, batch_size: int = 32
) -> np.ndarray:
    """The mean over ``config``'s views of ``model_or_fn``'s probabilities for ``pixels``
    (float32 ``[N, H, W, 3]``, 0–255). ``model_or_fn``: a Keras model whose outputs are
    probabilities (run with ``predict``), or a callable ``pixels -> probabilities``. ``config=None``
    is one plain call."""
    config = check(config)
    if isinstance(model_or_fn, keras.Model):
        model = model_or_fn

        def predict(x):
            return model.predict(x, batch_size=batch_size, verbose=0)
    elif callable(model_or_fn):
        predict = model_or_fn
    else:
        raise ValueError(
            f"model_or_fn: expected a Keras model or a callable, received {type(model_or_fn)}"
        )
    return average(view_probabilities(predict, pixels, config))


def view_probabilities(predict: Any, pixels: Any, config: TTAConfig | None) -> list[np.ndarray]:
    """``predict``'s probabilities for each view of ``pixels``, the image itself first (so a caller
    gets the plain answer and the TTA one from one pass: ``out[0]``, ``average(out)``)."""
    pixels = np.asarray(pixels, np.float32)
    views = [pixels] if config is None else [v.numpy() for v in config.views(pixels)]
    return [np.asarray(predict(v)) for v in views]


def average(per_view: list[np.ndarray]) -> np.ndarray:
    """The mean of per-view probabilities (float32)."""
    return np.mean(np.asarray(per_view, np.float64), axis=0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Client side: an export (``tlkeras.exports.loading``'s ExportedModel or EdgeExportedModel).


def refuse_baked_in(model: Any) -> None:
    """A ``ValueError`` if the export ``model`` already averages over views in its graph."""
    baked = (getattr(model, "metadata", None) or {}).get("tta")
    if baked:
        spec = baked.get("spec", baked) if isinstance(baked, dict) else baked
        raise ValueError(
            f"tta: the export at {str(model.path)!r} already averages over test-time views in its "
            f"graph (metadata.json tta: {spec!r}); expected client-side TTA only for an export "
            "without it: leave --tta at none"
        )


class TTAModel:
    """An export behind the same calls (``predict_pixels``, ``predict_bytes``, ``class_names``,
    ``input_size``, ``path``, ``metadata``…), answering with the mean over ``config``'s views of its
    float signature's probabilities; top-k recomputed from the mean (k: the export's ``top_k``)."""

    def __init__(self, model: Any, config: TTAConfig | str) -> None:
        config = check(config)
        if config is None:
            raise ValueError("tta: expected a TTAConfig for TTAModel, received none")
        refuse_baked_in(model)
        self.model = model
        self.config = config

    def __getattr__(self, name: str) -> Any:  # path, version, class_names, metadata, input_size
        if name in ("model", "config"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def predict_pixels(self, pixels: Any) -> dict[str, np.ndarray]:
        probabilities = average_probabilities(
            lambda v: self.model.predict_pixels(v)["probabilities"], pixels, self.config
        )
        top_k = int((self.model.metadata or {}).get("top_k", DEFAULT_TOP_K))
        k = min(top_k, probabilities.shape[-1])
        indices = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
        names = np.array([c.encode("utf-8") for c in self.model.class_names], dtype=object)
        return {
            "probabilities": probabilities,
            "classes": names[indices],
            "scores": np.take_along_axis(probabilities, indices, axis=-1),
        }

    def predict_bytes(self, images: Any) -> dict[str, np.ndarray]:
        """Decoded as the serving graph decodes them (size caps included), then ``predict_pixels``."""
        return self.predict_pixels(reference_decode(list(images), self.model.input_size))
