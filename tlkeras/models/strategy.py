"""Strategies: which blocks of the backbone train.

| strategy             | init        | trains                                | when (data size × similarity)       |
|----------------------|-------------|---------------------------------------|-------------------------------------|
| `scratch`            | random      | everything                            | lots of data, any domain            |
| `feature_extraction` | pretrained  | the new head only                     | small data, similar domain          |
| `partial`            | pretrained  | blocks >= `fine_tune_at` and the head | large+similar; small+dissimilar     |
| `full`               | pretrained  | everything, at a small learning rate  | large data, dissimilar domain       |

BatchNormalization rule. BN layers in frozen blocks are frozen, so they run in inference mode (Keras 3:
a BN layer with ``trainable=False`` always uses its moving statistics). Inside trainable blocks BN stays
frozen by default too, so a small fine-tuning batch never overwrites the pretrained moving mean/variance
(the Keras transfer-learning guide's advice; fastai's ``train_bn=False``). ``train_bn=True`` (chosen when
building, stored in the ModelSpec) lets BN inside trainable blocks train: statistics and γ/β. ``scratch``
always trains BN: a random network has no statistics to protect.

Why flags and not ``base_model(x, training=False)``: in Keras 3 a Functional model passes its own
``training`` value to nested models, overriding the ``training=False`` recorded in the graph, so the
guide's recipe updates BN statistics once the base is unfrozen (``tests/models/test_strategy.py`` shows it).
Dropout layers have no weights to freeze; those inside frozen blocks (EfficientNet's stochastic depth)
stay active in ``model.fit`` as in plain Keras, while the fast frozen path (``tlkeras.fitting.fast_path``)
computes frozen features in inference mode.
"""

from __future__ import annotations

import enum

import keras

from tlkeras.models.blocks import blocks, get_backbone_model, resolve_block_index
from tlkeras.models.spec import get_spec

# A short from-scratch run moves the weights fast; with Keras's default BatchNormalization momentum
# (0.99) the moving statistics lag behind and inference-mode accuracy sits at chance while training
# accuracy climbs (measured: MobileNet(alpha=0.25), digits 0-4 at 32x32, 8 epochs: 0.20 vs 0.88;
# with momentum 0.9: 0.91).
SCRATCH_BN_MOMENTUM = 0.9


class Strategy(str, enum.Enum):
    SCRATCH = "scratch"
    FEATURE_EXTRACTION = "feature_extraction"
    PARTIAL = "partial"
    FULL = "full"

    @classmethod
    def parse(cls, value: str | Strategy) -> Strategy:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower().replace("-", "_"))
        except ValueError:
            raise ValueError(
                f"strategy: expected one of {', '.join(s.value for s in cls)}, received {value!r}"
            ) from None

    @property
    def pretrained(self) -> bool:
        return self is not Strategy.SCRATCH

    @property
    def fine_tunes(self) -> bool:
        """Whether training has a second phase that unfreezes backbone blocks."""
        return self in (Strategy.PARTIAL, Strategy.FULL)


def check_fine_tune_at(strategy: Strategy, fine_tune_at: int | None) -> None:
    """``fine_tune_at`` is required by ``partial`` and meaningless for the others."""
    if strategy is Strategy.PARTIAL and fine_tune_at is None:
        raise ValueError(
            "fine_tune_at: strategy 'partial' expects a block index k (blocks < k stay frozen; "
            "negative counts from the end), received None"
        )
    if strategy is not Strategy.PARTIAL and fine_tune_at is not None:
        raise ValueError(
            f"fine_tune_at: only strategy 'partial' takes a block index; expected None with "
            f"strategy {strategy.value!r}, received {fine_tune_at!r}"
        )


def frozen_block_count(
    model: keras.Model, strategy: Strategy | str, fine_tune_at: int | None
) -> int:
    """How many leading blocks ``strategy`` freezes (0: none, len(blocks): the whole backbone)."""
    strategy = Strategy.parse(strategy)
    check_fine_tune_at(strategy, fine_tune_at)
    all_blocks = blocks(model)
    if strategy is Strategy.FEATURE_EXTRACTION:
        return len(all_blocks)
    if strategy is Strategy.PARTIAL:
        return resolve_block_index(all_blocks, fine_tune_at)
    return 0


def _with_sublayers(layer: keras.layers.Layer):
    yield layer
    for sub in getattr(layer, "layers", ()):  # nested Sequential/Functional (ConvNeXt's stem)
        yield from _with_sublayers(sub)


def apply_strategy(
    model: keras.Model,
    strategy: Strategy | str,
    fine_tune_at: int | None = None,
    *,
    train_bn: bool | None = None,
) -> int:
    """Set trainable flags on a tlkeras model per ``strategy``; returns the number of frozen blocks.

    Works on a freshly built model and again later on the same one (phase 2 of training). The head
    (every layer outside the backbone) always trains. Recompile the model afterwards: Keras reads
    trainable flags when it compiles. ``train_bn`` defaults to the model's ModelSpec (see the
    BatchNorm rule above).
    """
    strategy = Strategy.parse(strategy)
    n_frozen = frozen_block_count(model, strategy, fine_tune_at)
    if train_bn is None:
        train_bn = get_spec(model).train_bn
    train_bn = train_bn or strategy is Strategy.SCRATCH
    base = get_backbone_model(model)
    base.trainable = True  # a nested model's flag gates its layers': open it, then set per block
    for block in blocks(model):
        trains = block.index >= n_frozen
        for layer in block.layers:
            layer.trainable = trains
            for sub in _with_sublayers(layer):
                if isinstance(sub, keras.layers.BatchNormalization):
                    sub.trainable = trains and train_bn
    for layer in model.layers:
        if layer is not base:
            layer.trainable = True
    return n_frozen


def scratch_batchnorm(model: keras.Model, momentum: float = SCRATCH_BN_MOMENTUM) -> None:
    """The BatchNorm rule for ``scratch``: moving statistics that keep up with a short run.

    Lowers (never raises) the momentum of every BatchNormalization layer, nested models included;
    applying it twice changes nothing.
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            scratch_batchnorm(layer, momentum)
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.momentum > momentum:
            layer.momentum = momentum
