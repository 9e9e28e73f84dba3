"""What the model learned, as one self-contained page (``report.html``; ``tlkeras.workflows.report_html``).

    python scripts/report.py --run_dir=runs/hymenoptera/full            # rebuild a run's report
    python scripts/report.py --model=saved_models/hymenoptera --data=new_photos/ [--tta=flip]

A training run writes its report itself (``scripts/train.py --report``, on by default); ``--run_dir``
rebuilds it (the data is loaded again as the run loaded it: the same split). ``--model`` with
``--data`` scores an export on a labelled folder (every image) and writes the page, with its
metrics.json and plots, to ``--output_dir``: the top losses with Grad-CAM (exports written with
``--explain``), calibration, and test-time augmentation's gain with ``--tta``.
"""

from __future__ import annotations

from absl import flags

import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
from tlkeras import cli
from tlkeras.analysis import tta
from tlkeras.data import DataConfig
from tlkeras.workflows import evaluate, report

flags.DEFINE_string("run_dir", None, "A finished run directory: rebuild its report.html.")
flags.DEFINE_string("model", None, "An export (SavedModel base or version directory) to score.")
flags.DEFINE_string(
    "data",
    None,
    "With --model: a labelled folder (one subfolder per class). With --run_dir: the data to use "
    "instead of the run's own (same split settings).",
)
flags.DEFINE_string(
    "output_dir", None, "With --model: where to write (default: runs/evaluate/NAME/VERSION)."
)
cli.define_tta("with --model.")
flags.DEFINE_boolean("audit", True, "With --run_dir: audit the data again (audit.json).")
cli.define_config_flags(DataConfig, only=("batch_size",))
cli.define_max_bad_fraction()
flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    if (FLAGS.run_dir is None) == (FLAGS.model is None):
        raise ValueError("expected exactly one of --run_dir or --model (with --data)")
    if FLAGS.run_dir is not None:
        path = report.report_run(FLAGS.run_dir, FLAGS.data, audit=FLAGS.audit)
    else:
        if FLAGS.data is None:
            raise ValueError("--model: expected --data (a labelled folder) to score it on")
        metrics = evaluate.evaluate_export(
            FLAGS.model,
            FLAGS.data,
            batch_size=FLAGS.batch_size,
            output_dir=FLAGS.output_dir or evaluate.default_evaluate_dir(FLAGS.model),
            max_bad_fraction=FLAGS.max_bad_fraction,
            tta=tta.parse(FLAGS.tta),
            verbose=0,
        )
        path = metrics["report"]
    print(f"Report: {path}")


if __name__ == "__main__":
    cli.run(main, exit_now=True)
