"""Train and export an image classifier by transfer learning, in two phases.

With no flags it runs the embedded offline default: a MobileNet(alpha=0.25) pre-trained on digits
0-4 is transferred to digits 5-9 (``tlkeras.models.weights``), fine-tuned, scored on a held-out test split
and exported as a SavedModel.

    python scripts/train.py
    python scripts/train.py --data=../shared/data/hymenoptera/train --backbone=MobileNet \\
        --backbone_kwargs=alpha=0.25 --weights=../shared/weights/mobilenet_2_5_224_tf_no_top.h5 \\
        --strategy=partial --fine_tune_at=-4

Re-running the same command after an interruption resumes the run in ``--output_dir``; a finished
run there is never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import sys

from absl import flags
from absl import logging as absl_logging

import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
from tlkeras import cli
from tlkeras.data.augment import PRESET_HELP
from tlkeras.exports import edge
from tlkeras.fitting.distribute import DistributeConfig
from tlkeras.models.builder import DTYPE_POLICIES, AugmentConfig, HeadConfig
from tlkeras.models.strategy import Strategy
from tlkeras.workflows import training, transfer

_SOURCE = training.SOURCE_FINE_TUNING  # the defaults for source: weights (flag default None)
_C = training.TrainConfig()

cli.define_model_flags(
    "imagenet | none | PATH to a weights file | source:TASK (pre-train on a tlkeras task, e.g. "
    "source:digits:0-4)."
)
cli.define_split_flags(validation_data="")
cli.define_strategy_flags(training.DEFAULT_STRATEGY, "Which blocks train.")
TRAIN = cli.define_config_flags(
    training.TrainConfig,
    defaults={k: None for k in _SOURCE},
    notes={
        **{k: f"(default: {getattr(_C, k)}; {v} with source: weights)" for k, v in _SOURCE.items()},
        "fine_tune_learning_rate": f"({_SOURCE['fine_tune_learning_rate']} with source: weights)",
        "learning_rate": ", or auto: the LR finder's suggestion (scripts/find_lr.py; with the "
        "default L-BFGS head it sets the fine-tuning rate, a tenth of it).",
    },
)
HEAD = cli.define_config_flags(HeadConfig, only=("dropout",))
PRESET = cli.define_config_flags(
    AugmentConfig,
    only=("preset",),
    notes={"preset": "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()) + "."},
)
DISTRIBUTION = cli.define_config_flags(DistributeConfig)
flags.DEFINE_boolean(
    "augment",
    None,
    "Random flip/rotation/zoom/contrast in training (default: on; digits: shifts and turns only).",
)
flags.DEFINE_enum(
    "mixed_precision",
    DTYPE_POLICIES[0],
    list(DTYPE_POLICIES),
    "Keras dtype policy of the model (the head's output and the export stay float32).",
)
flags.DEFINE_string("output_dir", None, "Run directory (default: runs/MODEL_NAME/STRATEGY).")
flags.DEFINE_string(
    "base_dir",
    training.DEFAULT_EXPORT_DIR,
    "SavedModel base directory (BASE_DIR/MODEL_NAME/VERSION, as scripts/export.py); '' skips "
    "the export.",
)
cli.define_deprecated_alias("export_dir", "base_dir")
flags.DEFINE_string("model_name", None, "SavedModel name (default: from --data, e.g. digits_5_9).")
flags.DEFINE_list(
    "export_formats",
    [edge.SAVED_MODEL],
    f"What --base_dir receives, any of {', '.join([edge.SAVED_MODEL, *edge.EXPORT_FORMATS])}; "
    "edge files go to BASE_DIR/MODEL_NAME/edge/VERSION/FORMAT/, verified on the test split.",
)
flags.DEFINE_boolean("overwrite", False, "Replace a finished run in --output_dir.")
flags.DEFINE_boolean(
    "export_explain",
    False,
    "Add the Grad-CAM 'explain' signature to the SavedModel (scripts/predict.py --explain).",
)
flags.DEFINE_boolean(
    "report",
    True,
    "Write report.html (top losses with Grad-CAM, calibration, TTA gain, data audit) and "
    "audit.json in the run directory.",
)
flags.DEFINE_boolean(
    "baselines",
    None,
    "After training, the same network from scratch and a pixel logistic regression on the same "
    "split (default: on for the embedded digits only).",
)

flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    strategy = Strategy.parse(FLAGS.strategy)
    weights = cli.weights_for_strategy(strategy.value, FLAGS.weights, FLAGS["weights"].present)
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep TF's INFO lines off the console
    config = cli.config_values(TRAIN)  # TrainConfig's options: train() takes them as overrides
    augment = training.resolve_augment(
        FLAGS.augment, FLAGS.data, config["seed"], **cli.config_values(PRESET)
    )
    result = transfer.train_with_baselines(
        FLAGS.data,
        baselines=FLAGS.baselines,
        backbone=FLAGS.backbone,
        backbone_kwargs=cli.parse_kwargs(FLAGS.backbone_kwargs),
        weights=weights,
        image_size=FLAGS.image_size,
        strategy=strategy.value,
        fine_tune_at=FLAGS.fine_tune_at,
        augment=augment,
        validation_data=FLAGS.validation_data,
        validation_split=FLAGS.validation_split,
        test_split=FLAGS.test_split,
        max_bad_fraction=FLAGS.max_bad_fraction,
        output_dir=FLAGS.output_dir,
        export_dir=FLAGS.base_dir or None,
        model_name=FLAGS.model_name,
        export_formats=FLAGS.export_formats,
        overwrite=FLAGS.overwrite,
        report=FLAGS.report,
        export_explain=FLAGS.export_explain,
        mixed_precision=FLAGS.mixed_precision,
        distribution=DistributeConfig(**cli.config_values(DISTRIBUTION)),
        verbose=1 if sys.stdout.isatty() else 2,  # progress bars only on a terminal
        **cli.config_values(HEAD),
        **config,
    )
    print(f"Run directory: {result.run_dir}")  # the summary above already names the export


if __name__ == "__main__":
    cli.run(main, exit_now=True)
