"""Audit an image dataset before training: near-duplicates, leaks across splits, suspected mislabels.

Loads the data with the splits a training run with the same flags and seed makes, embeds every image
with a frozen pretrained backbone (its pooled features) and prints what ``tlkeras.analysis.audit`` finds;
writes it all to ``--output`` (``audit.json``).

    python scripts/audit.py --data=../shared/data/hymenoptera/train --backbone=MobileNet \\
        --backbone_kwargs=alpha=0.25 --weights=../shared/weights/mobilenet_2_5_224_tf_no_top.h5
"""

from __future__ import annotations

from absl import flags

import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
from tlkeras import cli
from tlkeras.analysis import audit
from tlkeras.analysis.audit_result import AuditConfig
from tlkeras.data import DataConfig

_A = AuditConfig()
_D = DataConfig()

flags.DEFINE_string("data", None, "Image folder (one subfolder per class), tfds:NAME or digits.")
flags.mark_flag_as_required("data")
cli.define_max_bad_fraction()
flags.adopt_module_key_flags(cli)
flags.DEFINE_string("backbone", audit.DEFAULT_BACKBONE, "A keras.applications model name.")
flags.DEFINE_string("backbone_kwargs", "", "Backbone constructor arguments, e.g. alpha=0.25.")
flags.DEFINE_string("weights", audit.DEFAULT_WEIGHTS, cli.WEIGHTS_HELP + " | none")
cli.define_image_size()
flags.DEFINE_float(
    "duplicate_threshold",
    _A.duplicate_threshold,
    "Cosine similarity of pooled features at or above which two images are near-duplicates.",
)
flags.DEFINE_float(
    "mislabel_confidence",
    _A.mislabel_confidence,
    "List an image when the cross-validated probe gives another class at least this probability.",
)
flags.DEFINE_integer("folds", _A.folds, "Cross-validation folds of the mislabel probe.")
flags.DEFINE_integer("max_pairs", _A.max_pairs, "Near-duplicate pairs listed per kind.")
flags.DEFINE_float(
    "validation_split", _D.validation_split, "Fraction of --data held out for validation."
)
flags.DEFINE_float("test_split", _D.test_split, "Fraction of --data held out for the test score.")
flags.DEFINE_integer("seed", _D.seed, "Seeds the split (as train.py's --seed) and the folds.")
flags.DEFINE_string("output", "audit.json", "Where to write the findings as JSON.")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    config = AuditConfig(
        duplicate_threshold=FLAGS.duplicate_threshold,
        mislabel_confidence=FLAGS.mislabel_confidence,
        folds=FLAGS.folds,
        max_pairs=FLAGS.max_pairs,
        seed=FLAGS.seed,
    )
    result = audit.audit_data(
        FLAGS.data,
        backbone=FLAGS.backbone,
        weights=cli.parse_weights(FLAGS.weights),
        image_size=FLAGS.image_size,
        backbone_kwargs=cli.parse_kwargs(FLAGS.backbone_kwargs) or None,
        config=config,
        validation_split=FLAGS.validation_split,
        test_split=FLAGS.test_split,
        seed=FLAGS.seed,
        max_bad_fraction=FLAGS.max_bad_fraction,
    )
    print(result.summary())
    print(f"wrote {result.write_json(FLAGS.output)}")


if __name__ == "__main__":
    cli.run(main, exit_now=True)
