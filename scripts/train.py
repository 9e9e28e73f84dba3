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
from tlkeras.data import DataConfig
from tlkeras.data.augment import PRESET_HELP
from tlkeras.exports import edge
from tlkeras.fitting.distribute import DistributeConfig, Distribution
from tlkeras.fitting.head_solver import SOLVERS
from tlkeras.fitting.optimizers import OPTIMIZERS, TRAIN_SCHEDULES
from tlkeras.models.builder import DTYPE_POLICIES, AugmentConfig, HeadConfig
from tlkeras.models.spec import PRESETS
from tlkeras.models.strategy import Strategy
from tlkeras.workflows import training, transfer

_C = training.TrainConfig()
_D = DataConfig()

flags.DEFINE_string(
    "data", training.DEFAULT_DATA, "Image folder, tfds:NAME[/CONFIG][:SPLIT], or digits[:A-B]."
)
flags.DEFINE_string(
    "validation_data",
    None,
    "Validation folder or tfds split (default: a stratified split of --data).",
)
flags.DEFINE_float(
    "validation_split", _D.validation_split, "Fraction of --data held out for validation."
)
flags.DEFINE_float(
    "test_split", _D.test_split, "Fraction of --data held out for the final test score."
)
cli.define_max_bad_fraction()
flags.DEFINE_string("backbone", training.DEFAULT_BACKBONE, "A keras.applications model name.")
flags.DEFINE_string(
    "backbone_kwargs",
    training.DEFAULT_BACKBONE_KWARGS,
    "Backbone constructor arguments, e.g. alpha=0.25.",
)
flags.DEFINE_string(
    "weights",
    training.DEFAULT_WEIGHTS,
    "imagenet | none | PATH to a weights file | source:TASK (pre-train on a tlkeras task, e.g. source:digits:0-4).",
)
cli.define_image_size()
flags.DEFINE_enum(
    "strategy", training.DEFAULT_STRATEGY, [s.value for s in Strategy], "Which blocks train."
)
flags.DEFINE_integer(
    "fine_tune_at",
    None,
    "partial only: first trainable block (negative counts from the end; default: the top half).",
)
flags.DEFINE_integer("epochs", _C.epochs, "Phase 1 epochs (head warm-up on the frozen backbone).")
_SOURCE = training.SOURCE_FINE_TUNING  # the defaults for source: weights
flags.DEFINE_integer(
    "fine_tune_epochs",
    None,
    f"Phase 2 epochs (partial/full); 0 skips it (default: {_C.fine_tune_epochs}; "
    f"{_SOURCE['fine_tune_epochs']} with source: weights).",
)
flags.DEFINE_string(
    "learning_rate",
    str(_C.learning_rate),
    "Phase 1 learning rate, or auto: the LR finder's suggestion (scripts/find_lr.py; with the "
    "default L-BFGS head it sets the fine-tuning rate, a tenth of it).",
)
flags.DEFINE_float(
    "fine_tune_learning_rate",
    None,
    "Phase 2 learning rate (default: learning_rate / 10; "
    f"{_SOURCE['fine_tune_learning_rate']:g} with source: weights).",
)
flags.DEFINE_integer(
    "early_stopping_patience",
    None,
    f"Epochs without a better validation loss before a phase stops (default: "
    f"{_C.early_stopping_patience}; {_SOURCE['early_stopping_patience']} with source: weights).",
)
flags.DEFINE_boolean(
    "reduce_lr_on_plateau",
    None,
    "Halve the learning rate when validation loss stalls (default: "
    f"{_C.reduce_lr_on_plateau}; {_SOURCE['reduce_lr_on_plateau']} with source: weights).",
)
flags.DEFINE_integer("batch_size", _C.batch_size, "Batch size.")
flags.DEFINE_boolean(
    "augment",
    None,
    "Random flip/rotation/zoom/contrast in training (default: on; digits: shifts and turns only).",
)
flags.DEFINE_enum(
    "augment_preset",
    AugmentConfig().preset,
    list(PRESETS),
    "With --augment: " + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()) + ".",
)
flags.DEFINE_enum(
    "optimizer", _C.optimizer, list(OPTIMIZERS), "Optimizer of every phase (decoupled decay)."
)
flags.DEFINE_float(
    "layer_decay",
    _C.layer_decay,
    "Fine-tuning: learning-rate multiplier per block from the head down (last block x decay, "
    "the one before x decay^2, ...); 1 is off.",
)
flags.DEFINE_integer(
    "unfreeze_stages",
    _C.unfreeze_stages,
    "Fine-tuning unfreezes the trainable blocks from the top in this many stages (gradual "
    "unfreezing, one recompile each); 1: all at once.",
)
flags.DEFINE_enum(
    "schedule",
    _C.schedule,
    list(TRAIN_SCHEDULES),
    "Learning-rate schedule of each phase: auto (cosine after one warm-up epoch for fine-tuning "
    "of 2+ epochs without --reduce_lr_on_plateau, constant otherwise), constant, or cosine decay "
    "over the phase's budget.",
)
flags.DEFINE_integer(
    "warmup_epochs",
    _C.warmup_epochs,
    "Linear warm-up epochs at each cosine phase's start (auto: 0 means 1).",
)
flags.DEFINE_boolean(
    "ema",
    _C.ema,
    "Fine-tuning: keep an exponential moving average of the weights; "
    "validate, checkpoint and export the averaged weights.",
)
flags.DEFINE_float("ema_momentum", _C.ema_momentum, "EMA momentum per step (with --ema).")
flags.DEFINE_enum(
    "mixed_precision",
    DTYPE_POLICIES[0],
    list(DTYPE_POLICIES),
    "Keras dtype policy of the model (the head's output and the export stay float32).",
)
flags.DEFINE_float("dropout", HeadConfig().dropout, "Dropout before the classifier layer.")
flags.DEFINE_float(
    "label_smoothing", _C.label_smoothing, "Label smoothing of the cross-entropy loss."
)
flags.DEFINE_string(
    "class_weight", None, "auto (balanced) | none | INDEX:WEIGHT,... e.g. 0:1.0,1:3.5."
)
flags.DEFINE_integer("seed", _C.seed, "Seeds Python, NumPy, TensorFlow and the data split.")
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
flags.DEFINE_boolean("fast", _C.fast, "Train the frozen phase on cached backbone features.")
flags.DEFINE_boolean(
    "baselines",
    None,
    "After training, the same network from scratch and a pixel logistic regression on the same "
    "split (default: on for the embedded digits only).",
)
flags.DEFINE_integer(
    "augment_views",
    _C.augment_views,
    "Augmented views per image cached on the fast path (plus the clean one); 0: clean only.",
    lower_bound=0,
)
flags.DEFINE_boolean(
    "converge_head",
    _C.converge_head,
    "On cached features, train the head until validation loss stops improving (not --epochs).",
)
flags.DEFINE_boolean(
    "refit",
    _C.refit,
    "feature_extraction on cached features: retrain the head on train + validation at the end.",
)
flags.DEFINE_enum(
    "head_solver",
    _C.head_solver,
    list(SOLVERS),
    "feature_extraction head on cached features: lbfgs solves a linear head to convergence "
    "(L2 strength chosen on validation); gradient trains it by epochs.",
)
flags.DEFINE_enum(
    "distribution",
    DistributeConfig().distribution.value,
    [d.value for d in Distribution],
    "tf.distribute strategy; multi_worker reads the cluster from TF_CONFIG. "
    "--batch_size is then per replica.",
)
flags.DEFINE_integer(
    "cpu_replicas",
    DistributeConfig().cpu_replicas,
    "mirrored only: split the CPU into N logical devices (no GPU needed).",
)
flags.DEFINE_string(
    "tpu", DistributeConfig().tpu, "tpu only: TPU name or grpc:// address, or 'local' (TPU VM)."
)

flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    strategy = Strategy.parse(FLAGS.strategy)
    weights = cli.weights_for_strategy(strategy.value, FLAGS.weights, FLAGS["weights"].present)
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep TF's INFO lines off the console
    augment = training.resolve_augment(
        FLAGS.augment, FLAGS.data, FLAGS.seed, preset=FLAGS.augment_preset
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
        dropout=FLAGS.dropout,
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
        epochs=FLAGS.epochs,
        fine_tune_epochs=FLAGS.fine_tune_epochs,
        learning_rate=cli.parse_learning_rate(FLAGS.learning_rate),
        fine_tune_learning_rate=FLAGS.fine_tune_learning_rate,
        early_stopping_patience=FLAGS.early_stopping_patience,
        reduce_lr_on_plateau=FLAGS.reduce_lr_on_plateau,
        batch_size=FLAGS.batch_size,
        label_smoothing=FLAGS.label_smoothing,
        class_weight=cli.parse_class_weight(FLAGS.class_weight),
        seed=FLAGS.seed,
        fast=FLAGS.fast,
        augment_views=FLAGS.augment_views,
        converge_head=FLAGS.converge_head,
        refit=FLAGS.refit,
        head_solver=FLAGS.head_solver,
        optimizer=FLAGS.optimizer,
        layer_decay=FLAGS.layer_decay,
        unfreeze_stages=FLAGS.unfreeze_stages,
        schedule=FLAGS.schedule,
        warmup_epochs=FLAGS.warmup_epochs,
        ema=FLAGS.ema,
        ema_momentum=FLAGS.ema_momentum,
        mixed_precision=FLAGS.mixed_precision,
        distribution=DistributeConfig(
            FLAGS.distribution, cpu_replicas=FLAGS.cpu_replicas, tpu=FLAGS.tpu
        ),
        verbose=1 if sys.stdout.isatty() else 2,  # progress bars only on a terminal
    )
    print(f"Run directory: {result.run_dir}")  # the summary above already names the export


if __name__ == "__main__":
    cli.run(main, exit_now=True)
