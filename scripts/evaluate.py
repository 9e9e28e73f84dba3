"""Score an exported SavedModel on a labelled image folder (every image; no split).

    python scripts/evaluate.py --model=saved_models/hymenoptera/1 --data=path/to/val

``--model`` may also be the model's base directory (``saved_models/NAME``: the highest version), or an
edge export (a ``.tflite``/``.onnx`` file or its folder, ``scripts/export.py --format``).
Prints the per-class report and writes ``metrics.json`` and ``confusion.png`` to ``--output_dir``.
``--tta=flip`` (or ``flip,crops``; ``tlkeras.analysis.tta``) scores the mean over test-time views and reports
the accuracy without and with them (``metrics.json``: ``tta``).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

import tlkeras  # noqa: F401  (first: quiets TensorFlow's start-up logs)
from tlkeras import cli
from tlkeras.analysis import tta
from tlkeras.data import DataConfig
from tlkeras.workflows import evaluate

flags.DEFINE_string(
    "model",
    None,
    "SavedModel version directory, its base directory, or a .tflite/.onnx export.",
    required=True,
)
flags.DEFINE_string(
    "data", None, "Folder with one subfolder per class (or tfds:NAME:SPLIT).", required=True
)
cli.define_config_flags(DataConfig, only=("batch_size",))
cli.define_max_bad_fraction()
cli.define_tta("reports the accuracy with and without it.")
flags.adopt_module_key_flags(cli)
flags.DEFINE_string(
    "output_dir",
    None,
    "Where to write metrics.json and confusion.png (default: runs/evaluate/NAME/VERSION).",
)

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected only --flags, received extra arguments {argv[1:]}")
    config = tta.parse(FLAGS.tta)
    model = Path(FLAGS.model)
    if not model.exists():
        raise FileNotFoundError(
            f"--model: expected a SavedModel directory, received {FLAGS.model!r} (not found)"
        )
    output_dir = FLAGS.output_dir or evaluate.default_evaluate_dir(model)
    evaluate.evaluate_export(
        model,
        FLAGS.data,
        batch_size=FLAGS.batch_size,
        output_dir=output_dir,
        max_bad_fraction=FLAGS.max_bad_fraction,
        tta=config,
    )
    print(f"Metrics written to {Path(output_dir) / 'metrics.json'}")


if __name__ == "__main__":
    cli.run(main, exit_now=True)
