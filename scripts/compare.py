"""Train every strategy on the same data and split; print one table and plot it.

With no flags it runs the offline transfer story: a MobileNet(alpha=0.25) pre-trained on digits 0-4
(``tlkeras.fitting.pretrain``) is transferred to digits 5-9 with each strategy, next to ``scratch``.

    python scripts/compare.py
    python scripts/compare.py --data=../shared/data/hymenoptera/train --backbone=MobileNet \\
        --backbone_kwargs=alpha=0.25 --weights=../shared/weights/mobilenet_2_5_224_tf_no_top.h5 \\
        --image_size=224 --output_dir=runs/compare_hymenoptera

Writes ``comparison.json``, ``comparison.png`` and one run directory per strategy to
``--output_dir``.
"""

from __future__ import annotations

from absl import flags

import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
from tlkeras import cli
from tlkeras.data import DataConfig, image_size_for, load
from tlkeras.fitting import pretrain
from tlkeras.models.builder import AugmentConfig
from tlkeras.workflows import transfer
from tlkeras.workflows.training import TrainConfig

_C = TrainConfig()
_D = DataConfig()

cli.define_model_flags(
    "Initial weights of the pretrained strategies: imagenet | none | PATH | source:TASK "
    "(scratch always starts from random init)."
)
flags.adopt_module_key_flags(cli)
flags.DEFINE_string("validation_data", None, "Validation folder or tfds split (default: a split).")
flags.DEFINE_float("validation_split", _D.validation_split, "Fraction held out for validation.")
flags.DEFINE_float("test_split", _D.test_split, "Fraction held out for the test accuracy.")
flags.DEFINE_list("strategies", list(transfer.STRATEGIES), "Strategies to compare.")
flags.DEFINE_integer("fine_tune_at", None, "First trainable block of 'partial' (default: half).")
flags.DEFINE_integer("epochs", _C.epochs, "Phase 1 epochs (the whole budget of scratch/frozen).")
flags.DEFINE_integer("fine_tune_epochs", _C.fine_tune_epochs, "Phase 2 epochs (partial, full).")
flags.DEFINE_float("learning_rate", _C.learning_rate, "Phase 1 learning rate.")
flags.DEFINE_integer("batch_size", _C.batch_size, "Batch size.")
flags.DEFINE_boolean("augment", False, "Random flip/rotation/zoom/contrast during training.")
flags.DEFINE_boolean("fast", _C.fast, "Use the fast frozen path for phase 1 when valid.")
flags.DEFINE_integer("seed", _C.seed, "Seeds Python, NumPy, TensorFlow and the split.")
flags.DEFINE_string("output_dir", "runs/compare", "Where the table, plot and runs go.")
flags.DEFINE_integer("verbose", 0, "Keras verbosity of each run (0, 1, 2).")
flags.DEFINE_boolean("report", True, "Each strategy's run writes its report.html.")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received positional arguments {argv[1:]}")
    transfer.check_strategies(FLAGS.strategies)  # before any data loading or pre-training
    backbone_kwargs = cli.parse_kwargs(FLAGS.backbone_kwargs)
    size, _ = image_size_for(FLAGS.image_size, FLAGS.weights, FLAGS.backbone, FLAGS.data)
    config = TrainConfig(
        epochs=FLAGS.epochs,
        fine_tune_epochs=FLAGS.fine_tune_epochs,
        learning_rate=FLAGS.learning_rate,
        batch_size=FLAGS.batch_size,
        fast=FLAGS.fast,
        seed=FLAGS.seed,
    )
    weights = pretrain.resolve(FLAGS.weights, FLAGS.backbone, backbone_kwargs, (size, size, 3))
    data = load(
        FLAGS.data,
        validation=FLAGS.validation_data,
        image_size=(size, size),
        batch_size=FLAGS.batch_size,
        validation_split=FLAGS.validation_split,
        test_split=FLAGS.test_split,
        seed=FLAGS.seed,
        max_bad_fraction=FLAGS.max_bad_fraction,
    )
    print(data.summary(), flush=True)
    table = transfer.compare_strategies(
        data,
        backbone=FLAGS.backbone,
        backbone_kwargs=backbone_kwargs,
        weights=weights,
        strategies=FLAGS.strategies,
        fine_tune_at=FLAGS.fine_tune_at,
        config=config,
        augment=AugmentConfig() if FLAGS.augment else None,
        output_dir=FLAGS.output_dir,
        verbose=FLAGS.verbose,
        report=FLAGS.report,
    )
    paths = table.save(FLAGS.output_dir)
    print(table)
    print(f"wrote {paths['json']} and {paths['png']}")


if __name__ == "__main__":
    cli.run(main, exit_now=True)
