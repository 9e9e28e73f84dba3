"""Find a learning rate before training: the learning-rate range test (``tlkeras.fitting.lr_finder``).

Loads the data and builds the model as ``scripts/train.py`` does with the same flags, trains a copy
for at most ``--steps`` batches while the learning rate grows from ``--min_lr`` to ``--max_lr``, and
prints the suggestion (the learning rate at the minimum of the smoothed loss / 10), the rule, and
the whole curve as one JSON line; ``--output`` receives the plot.

    python scripts/find_lr.py --data=../shared/data/hymenoptera/train --backbone=MobileNet \\
        --backbone_kwargs=alpha=0.25 --weights=../shared/weights/mobilenet_2_5_224_tf_no_top.h5

``--strategy=feature_extraction`` (the default) sweeps the head warm-up, on cached backbone
features with ``--fast``: its suggestion is train.py's ``--learning_rate``. ``partial``/``full``
sweep fine-tuning end to end, ``scratch`` its one phase.
"""

from __future__ import annotations

import json

from absl import flags
from absl import logging as absl_logging

import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
from tlkeras import cli
from tlkeras.fitting import lr_finder
from tlkeras.models.strategy import Strategy
from tlkeras.workflows import training

cli.define_model_flags(cli.WEIGHTS_HELP + " | none")
cli.define_split_flags()
cli.define_strategy_flags(
    Strategy.FEATURE_EXTRACTION.value,
    "Which blocks train during the sweep: feature_extraction is the head warm-up "
    "(train.py's --learning_rate); partial/full fine-tuning; scratch everything.",
)
TRAIN = cli.define_config_flags(
    training.TrainConfig,
    only=("batch_size", "seed", "label_smoothing", "fast"),
    notes={"fast": "(feature_extraction: the head's sweep)"},
)
flags.DEFINE_float("min_lr", lr_finder.DEFAULT_MIN_LR, "Learning rate of the first batch.")
flags.DEFINE_float("max_lr", lr_finder.DEFAULT_MAX_LR, "Learning rate of the last batch.")
flags.DEFINE_integer(
    "steps",
    lr_finder.DEFAULT_STEPS,
    f"Batches at most (>= {lr_finder.MIN_STEPS}; the training split is cycled when shorter).",
)
flags.DEFINE_string("output", "lr_find.png", "Where to write the plot of loss against LR.")

flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    strategy = Strategy.parse(FLAGS.strategy)
    weights = cli.weights_for_strategy(strategy.value, FLAGS.weights, FLAGS["weights"].present)
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep TF's INFO lines off the console
    config = training.resolve_config(None, weights, **cli.config_values(TRAIN))
    result = training.find_lr_for(
        FLAGS.data,
        backbone=FLAGS.backbone,
        backbone_kwargs=cli.parse_kwargs(FLAGS.backbone_kwargs),
        weights=weights,
        image_size=FLAGS.image_size,
        strategy=strategy.value,
        fine_tune_at=FLAGS.fine_tune_at,
        validation_split=FLAGS.validation_split,
        test_split=FLAGS.test_split,
        max_bad_fraction=FLAGS.max_bad_fraction,
        config=config,
        min_lr=FLAGS.min_lr,
        max_lr=FLAGS.max_lr,
        steps=FLAGS.steps,
        verbose=1,
    )
    plot = result.plot(FLAGS.output)
    where = "on cached backbone features" if result.on_cached_features else "end to end"
    print(
        f"Swept {len(result.lrs)} batches {where} ({result.stop_reason}); steepest descent at "
        f"{result.steepest:.3g}, lowest loss at {result.min_loss_lr:.3g}"
    )
    print(f"Suggested learning rate: {result.suggestion:.3g} ({result.rule})")
    print(json.dumps({**result.to_dict(), "plot": str(plot)}))
    print(f"Plot: {plot}")


if __name__ == "__main__":
    cli.run(main, exit_now=True)
