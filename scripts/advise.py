"""Recommend a transfer-learning strategy for a backbone and a dataset, with the evidence.

One forward pass of the frozen pretrained backbone (and one of the same architecture with random
weights) over the labelled images gives a linear-probe gain and LogME scores; with the image count
they pick one of four cases (``tlkeras.analysis.advisor``). With no flags it runs offline on digits 5-9 with a
MobileNet(alpha=0.25) pre-trained on digits 0-4.

    python scripts/advise.py --data=../shared/data/hymenoptera/train --backbone=MobileNet \\
        --backbone_kwargs=alpha=0.25 --weights=../shared/weights/mobilenet_2_5_224_tf_no_top.h5

``--candidates="MobileNet(alpha=0.25)@PATH;MobileNetV2(alpha=0.35)@imagenet"`` also ranks several
backbones by LogME on the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
from tlkeras import cli
from tlkeras.analysis import advisor

cli.define_model_flags()
flags.DEFINE_string(
    "candidates",
    None,
    "Also rank backbones by LogME: NAME[(key=value,...)][@WEIGHTS] separated by ';' "
    "(weights default to --weights).",
)
ADVISOR = cli.define_config_flags(advisor.AdvisorConfig)
flags.DEFINE_string("output", None, "Also write the advice (and ranking) as JSON to this file.")
flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    weights = cli.parse_weights(FLAGS.weights)
    candidates = cli.parse_candidates(FLAGS.candidates, weights) if FLAGS.candidates else None
    config = advisor.AdvisorConfig(
        **cli.config_values(ADVISOR), max_bad_fraction=FLAGS.max_bad_fraction
    )
    advice = advisor.advise(
        FLAGS.data,
        FLAGS.backbone,
        weights=weights,
        backbone_kwargs=cli.parse_kwargs(FLAGS.backbone_kwargs),
        image_size=FLAGS.image_size,
        config=config,
    )
    print(advice.summary())
    record = {"advice": advice.to_dict()}
    if candidates:
        ranking = advisor.rank_backbones(
            FLAGS.data, candidates, image_size=FLAGS.image_size, config=config
        )
        print("\nbackbones ranked by LogME (higher transfers better):")
        print(advisor.ranking_table(ranking))
        record["ranking"] = [r.to_dict() for r in ranking]
    if FLAGS.output:
        path = Path(FLAGS.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main, exit_now=True)
