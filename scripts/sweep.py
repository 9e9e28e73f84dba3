"""Sweep the freeze point k: validation accuracy against k, frozen vs fine-tuned, scratch baseline.

For each k, blocks < k stay frozen and the rest trains on the fast frozen path (``tlkeras.workflows.sweep``);
``--fine_tune`` then fine-tunes everything. Writes ``sweep.json``, ``sweep.csv`` and ``sweep.png``
to ``--output_dir`` and prints the table and the recommended k. With no flags it runs offline on
digits 5-9 with a MobileNet(alpha=0.25) pre-trained on digits 0-4.

    python scripts/sweep.py --data=../shared/data/hymenoptera/train --backbone=MobileNet \\
        --backbone_kwargs=alpha=0.25 --weights=../shared/weights/mobilenet_2_5_224_tf_no_top.h5 \\
        --ks=2,5,8,11,14 --epochs=10 --output_dir=runs/sweep_hymenoptera
"""

from __future__ import annotations

from absl import flags

import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
from tlkeras import cli
from tlkeras.data import DataConfig
from tlkeras.models.builder import AugmentConfig
from tlkeras.workflows.sweep import (
    DEFAULT_EPOCHS,
    DEFAULT_FINE_TUNE_LEARNING_RATE,
    DEFAULT_KS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_PATIENCE,
    sweep,
)
from tlkeras.workflows.sweep_report import DEFAULT_NOISE_SIGMAS

cli.define_model_flags()
cli.define_split_flags(
    validation_data="(k is chosen on it)", notes={"validation_split": "(k is chosen on it)"}
)
flags.DEFINE_list(
    "ks",
    [str(k) for k in DEFAULT_KS],
    "Block indices k (blocks < k frozen); the block count freezes the whole backbone.",
)
flags.DEFINE_integer("epochs", DEFAULT_EPOCHS, "Epochs of each frozen-prefix run.")
flags.DEFINE_boolean("fine_tune", False, "Then fine-tune each model end to end.")
flags.DEFINE_integer("fine_tune_epochs", None, "Fine-tuning epochs (default: --epochs).")
flags.DEFINE_float("learning_rate", DEFAULT_LEARNING_RATE, "Frozen-prefix learning rate.")
flags.DEFINE_float(
    "fine_tune_learning_rate", DEFAULT_FINE_TUNE_LEARNING_RATE, "Fine-tuning learning rate."
)
flags.DEFINE_boolean("scratch", True, "Train the from-scratch baseline.")
flags.DEFINE_integer("scratch_epochs", None, "Baseline epochs (default: the transferred total).")
flags.DEFINE_boolean("augment", False, "Random flip/rotation/zoom/contrast (cached views).")
flags.DEFINE_integer("patience", DEFAULT_PATIENCE, "Early stopping patience; 0 disables.")
flags.DEFINE_float(
    "noise_sigmas", DEFAULT_NOISE_SIGMAS, "Rows within this many noise stds of the best tie."
)
cli.define_config_flags(DataConfig, only=("batch_size", "seed"), notes={"seed": "(and the heads)"})
flags.DEFINE_string("output_dir", DEFAULT_OUTPUT_DIR, "Where sweep.json/.csv/.png go.")
flags.DEFINE_integer("verbose", 1, "0 quiet, 1 a line per model, 2 also per epoch.")
flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def parse_ks(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(
            f"--ks: expected comma-separated block indices such as 2,5,8,11, received "
            f"{','.join(values)!r}"
        ) from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    result = sweep(
        FLAGS.data,
        FLAGS.backbone,
        parse_ks(FLAGS.ks),
        weights=cli.parse_weights(FLAGS.weights),
        backbone_kwargs=cli.parse_kwargs(FLAGS.backbone_kwargs),
        image_size=FLAGS.image_size,
        fine_tune=FLAGS.fine_tune,
        epochs=FLAGS.epochs,
        fine_tune_epochs=FLAGS.fine_tune_epochs,
        learning_rate=FLAGS.learning_rate,
        fine_tune_learning_rate=FLAGS.fine_tune_learning_rate,
        baseline_scratch=FLAGS.scratch,
        scratch_epochs=FLAGS.scratch_epochs,
        augment=AugmentConfig(seed=FLAGS.seed) if FLAGS.augment else None,
        patience=FLAGS.patience,
        noise_sigmas=FLAGS.noise_sigmas,
        batch_size=FLAGS.batch_size,
        validation_split=FLAGS.validation_split,
        test_split=FLAGS.test_split,
        seed=FLAGS.seed,
        max_bad_fraction=FLAGS.max_bad_fraction,
        validation_data=FLAGS.validation_data,
        output_dir=FLAGS.output_dir,
        verbose=FLAGS.verbose,
    )
    print(result.summary())
    print("wrote " + ", ".join(result.paths.values()))


if __name__ == "__main__":
    cli.run(main, exit_now=True)
