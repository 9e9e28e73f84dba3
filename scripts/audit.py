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

cli.define_model_flags(
    cli.WEIGHTS_HELP + " | none",
    data=None,
    backbone=audit.DEFAULT_BACKBONE,
    backbone_kwargs="",
    weights=audit.DEFAULT_WEIGHTS,
)
flags.mark_flag_as_required("data")
AUDIT = cli.define_config_flags(
    AuditConfig, notes={"seed": "(and the split, as train.py's --seed)"}
)
cli.define_split_flags()
flags.DEFINE_string("output", "audit.json", "Where to write the findings as JSON.")
flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    config = AuditConfig(**cli.config_values(AUDIT))
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
