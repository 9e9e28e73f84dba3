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
from tlkeras.data import image_size_for, load
from tlkeras.fitting import pretrain
from tlkeras.models.builder import AugmentConfig
from tlkeras.workflows import transfer
from tlkeras.workflows.training import TrainConfig

cli.define_model_flags(
    "Initial weights of the pretrained strategies: imagenet | none | PATH | source:TASK "
    "(scratch always starts from random init)."
)
cli.define_split_flags(validation_data="")
flags.DEFINE_list("strategies", list(transfer.STRATEGIES), "Strategies to compare.")
cli.define_fine_tune_at()
TRAIN = cli.define_config_flags(
    TrainConfig, only=("epochs", "fine_tune_epochs", "learning_rate", "batch_size", "fast", "seed")
)
flags.DEFINE_boolean("augment", False, "Random flip/rotation/zoom/contrast during training.")
flags.DEFINE_string("output_dir", "runs/compare", "Where the table, plot and runs go.")
flags.DEFINE_integer("verbose", 0, "Keras verbosity of each run (0, 1, 2).")
flags.DEFINE_boolean("report", True, "Each strategy's run writes its report.html.")
flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received positional arguments {argv[1:]}")
    transfer.check_strategies(FLAGS.strategies)  # before any data loading or pre-training
    backbone_kwargs = cli.parse_kwargs(FLAGS.backbone_kwargs)
    size, _ = image_size_for(FLAGS.image_size, FLAGS.weights, FLAGS.backbone, FLAGS.data)
    config = TrainConfig(**cli.config_values(TRAIN))
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
