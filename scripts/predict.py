"""Classify images with an exported SavedModel (TensorFlow only, no model code needed) or an edge
export (``.tflite`` in LiteRT, ``.onnx`` in onnxruntime).

    python scripts/predict.py --model=saved_models/ants_bees photo.jpg more_photos/ [--json]
    python scripts/predict.py --model=saved_models/ants_bees/edge/1/tflite_int8/model.tflite photo.jpg

``--model`` is a model base directory (highest version), one version directory, or an edge export
(its model file or folder; images are decoded as the SavedModel's serving graph decodes them). Prints the top-k
classes per image; files that cannot be decoded are reported per file and make the exit code 1.
``--tta=flip`` averages over test-time views (``tlkeras.analysis.tta``); ``--min_score=0.6`` shows "unknown"
for an image whose top score is below 0.6 (as ``scripts/serve.py``'s ``min_score``).

``--explain`` also writes a Grad-CAM overlay per image (``tlkeras.analysis.gradcam``: where the evidence for
its top class lies), as ``--explain_dir/<stem>.gradcam.png`` (default ``./explain/``, created if
missing; ``<stem>-2`` and so on where two images share a stem; files of an earlier run with the same
names are replaced), over the photo at its own size (longest side capped at 1024 px). The table and
the JSON list each PNG with the class it explains (the model's own top class on the image, without
TTA views). It needs a SavedModel exported with the ``explain`` signature
(``scripts/export.py --explain``, ``tlkeras.export(explain=True)``); others end in one line.
"""

import json

from absl import flags

import tlkeras.cli
from tlkeras.analysis import calibration, tta
from tlkeras.exports import loading as exported

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
tlkeras.cli.define_tta("the mean over the views is shown.")
flags.DEFINE_float(
    "min_score",
    0.0,
    'An image whose top score is below it is shown as "unknown" at every rank (scores kept). '
    "0: off.",
)
flags.DEFINE_bool(
    "explain",
    False,
    "Also write a Grad-CAM overlay PNG per image into --explain_dir (needs an export written with "
    "--explain).",
)
flags.DEFINE_string(
    "explain_dir", "explain", "Where --explain writes <stem>.gradcam.png (created if missing)."
)
flags.mark_flag_as_required("model")
flags.adopt_module_key_flags(tlkeras.cli)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise ValueError("expected at least one IMAGE_OR_FOLDER argument, received none")
    config = tta.parse(FLAGS.tta)
    min_score = calibration.check_min_score(FLAGS.min_score, "--min_score")
    model = exported.load_exported(FLAGS.model)
    if FLAGS.explain:  # before any work: an export without the signature ends in one line
        exported.require_explain(model)
    if config is not None:
        model = tta.TTAModel(model, config)
    results = exported.predict_files(
        model, argv[1:], top_k=FLAGS.top_k, batch_size=FLAGS.batch_size
    )
    for r in results:
        if min_score and "classes" in r:
            r["classes"] = list(
                calibration.withhold_low_scores([r["classes"]], [r["scores"]], min_score)[0]
            )
    if FLAGS.explain:
        done = [r["path"] for r in results if "error" not in r]
        explained = exported.explain_files(
            model, done, FLAGS.explain_dir, batch_size=FLAGS.batch_size
        )
        for r in results:
            if r["path"] in explained:
                r["gradcam"] = explained[r["path"]]
    if FLAGS.json:
        print(
            json.dumps({"model": str(model.path), "results": results}, indent=2, ensure_ascii=False)
        )
    else:
        print(exported.format_predictions(results))
    failed = any("error" in r or "error" in r.get("gradcam", {}) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    tlkeras.cli.run(main, exit_now=True)
