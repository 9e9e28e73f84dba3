"""Classify images with an exported SavedModel (TensorFlow only, no model code needed) or an edge
export (``.tflite`` in LiteRT, ``.onnx`` in onnxruntime).

    python scripts/predict.py --model=saved_models/ants_bees photo.jpg more_photos/ [--json]
    python scripts/predict.py --model=saved_models/ants_bees/edge/1/tflite_int8/model.tflite photo.jpg

``--model`` is a model base directory (highest version), one version directory, or an edge export
(its model file or folder; images are decoded as the SavedModel's serving graph decodes them). Prints the top-k
classes per image; files that cannot be decoded are reported per file and make the exit code 1.
"""

import json

from absl import flags

import tlkeras.cli
from tlkeras import exported

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    None,
    "saved_models/NAME (highest version), saved_models/NAME/VERSION, or a .tflite/.onnx export.",
)
flags.DEFINE_integer(
    "top_k", None, "Show at most this many classes (default: all the model returns).", lower_bound=1
)
flags.DEFINE_bool("json", False, "Print one JSON document instead of a table.")
flags.DEFINE_integer("batch_size", 16, "Images per call to the model.", lower_bound=1)
flags.mark_flag_as_required("model")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise ValueError("expected at least one IMAGE_OR_FOLDER argument, received none")
    model = exported.load_exported(FLAGS.model)
    results = exported.predict_files(
        model, argv[1:], top_k=FLAGS.top_k, batch_size=FLAGS.batch_size
    )
    if FLAGS.json:
        print(
            json.dumps({"model": str(model.path), "results": results}, indent=2, ensure_ascii=False)
        )
    else:
        print(exported.format_predictions(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    tlkeras.cli.run(main, exit_now=True)
