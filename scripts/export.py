"""Export a trained Keras model as a TF-Serving SavedModel (``<base_dir>/<model_name>/<version>/``),
or a model or SavedModel as a TFLite / ONNX file for phones, browsers and microcontrollers.

    python scripts/export.py --model=runs/ants_bees/model.keras --model_name=ants_bees \
        --images=../shared/data/hymenoptera/train/ants
    python scripts/export.py --model=saved_models/ants_bees --format=tflite --quantization=int8 \
        --calibration_data=path/to/train --eval_data=path/to/test

Edge files go to ``<base_dir>/<model_name>/edge/<version>/<format>/`` (or ``--output_dir``) with
``labels.txt`` and ``metadata.json``; each is run in LiteRT/onnxruntime on ``--eval_data`` (or
``--images``) and its agreement, accuracy, size and latency printed. A float32 file that disagrees
with the model is refused.

``--model`` is a ``.keras`` file (loaded with Keras ``safe_mode``) or a training run directory holding
``model.keras``; for the edge formats also a SavedModel (version or base directory). Class names come
from ``--class_names``, the run's ``metrics.json`` or the SavedModel's labels. The SavedModel export
is verified in a fresh process before its version directory appears. ``--temperature`` (a
calibration temperature) and ``--tta`` (test-time views averaged) go into the SavedModel's graph
and its ``metadata.json`` (``calibration``, ``tta``). ``--explain`` adds the ``explain`` signature
(Grad-CAM heat maps, ``tlkeras.analysis.gradcam``) that ``scripts/predict.py --explain`` uses; off by default
as it costs time (MobileNet(0.25) at 224 px: export 2.1 -> 3.6 s, ``tf.saved_model.load`` 0.60 ->
0.87 s).
"""

from absl import flags, logging

import tlkeras.cli
from tlkeras.analysis import calibration, tta
from tlkeras.data import decoding
from tlkeras.exports import edge, layout, savedmodel
from tlkeras.exports import loading as exported
from tlkeras.workflows import export_run

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    None,
    "A .keras model file, or a run directory containing model.keras; edge formats: also a "
    "SavedModel directory.",
)
flags.DEFINE_string("model_name", None, "Model name: the folder under --base_dir and the URL name.")
flags.DEFINE_string("base_dir", layout.DEFAULT_BASE_DIR, "SavedModel base directory.")
flags.DEFINE_list(
    "class_names", None, "Class names in output order (default: the run's metrics.json)."
)
flags.DEFINE_integer("version", None, "Version number (default: the next free one).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace an existing --version.")
flags.DEFINE_integer("top_k", decoding.DEFAULT_TOP_K, "Classes returned per image.", lower_bound=1)
flags.DEFINE_multi_string(
    "images", [], "Image files or folders for verification and TF Serving warmup."
)
flags.DEFINE_integer("max_images", 8, "At most this many --images are used.", lower_bound=1)
flags.DEFINE_bool("verify", True, "Verify the export in a fresh process.")
flags.DEFINE_float(
    "temperature",
    1.0,
    "Calibration temperature the signatures apply to the probabilities (logits / T; fit it on "
    "validation data with tlkeras.analysis.calibration.fit_temperature); 1: unchanged.",
)
tlkeras.cli.define_tta("in the graph: the signatures average over the views.")
flags.DEFINE_bool(
    "explain",
    False,
    "Add the explain signature (Grad-CAM heat maps of the top class, bytes in) for "
    "scripts/predict.py --explain.",
)
flags.DEFINE_enum("format", "saved_model", ["saved_model", *edge.FORMATS], "What to write.")
tlkeras.cli.define_config_flags(edge.EdgeConfig, only=("quantization", "io_type"))
flags.DEFINE_string(
    "calibration_data", None, "int8: training images (one subfolder per class) to calibrate on."
)
flags.DEFINE_string(
    "eval_data", None, "Edge formats: a labelled folder to verify on and score (else --images)."
)
flags.DEFINE_string(
    "output_dir", None, "Edge formats: where to write (default under --base_dir, see above)."
)
tlkeras.cli.define_max_bad_fraction()  # of --calibration_data and --eval_data
flags.adopt_module_key_flags(tlkeras.cli)
flags.mark_flags_as_required(["model"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected no positional arguments, received {argv[1:]}")
    if not FLAGS["verbosity"].present:  # tf.saved_model.save logs every asset at INFO
        logging.set_verbosity(logging.WARNING)
    config = tta.parse(FLAGS.tta)
    temperature = calibration.check_temperature(FLAGS.temperature, "--temperature")
    if FLAGS.format != "saved_model":
        if config is not None or temperature != 1.0:
            raise ValueError(
                f"--tta/--temperature: expected only with --format=saved_model, received "
                f"--format={FLAGS.format}; export a SavedModel with them, then convert that"
            )
        if FLAGS.explain:
            raise ValueError(
                f"--explain: expected only with --format=saved_model, received "
                f"--format={FLAGS.format} (TFLite/ONNX files carry no gradients)"
            )
        _export_edge()
        return
    if not FLAGS.model_name:
        raise ValueError("--model_name: expected a name for the SavedModel, received none")
    model, class_names = exported.load_keras_model(FLAGS.model, FLAGS.class_names)
    images = exported.read_images(FLAGS.images, limit=FLAGS.max_images) if FLAGS.images else None
    result = savedmodel.export(
        model,
        FLAGS.model_name,
        base_dir=FLAGS.base_dir,
        class_names=class_names,
        version=FLAGS.version,
        overwrite=FLAGS.overwrite,
        top_k=FLAGS.top_k,
        verify=FLAGS.verify,
        warmup_images=images,
        temperature=temperature,
        tta=config,
        explain=FLAGS.explain,
    )
    print(f"exported {result.model_name} version {result.version} to {result.path}")
    if result.verification:
        v = result.verification
        print(
            "verified in a fresh process: max abs diff "
            f"float {v['serving_float_max_abs_diff']:.2e}, bytes {v['serving_default_max_abs_diff']:.2e} "
            f"on {v['num_images']} images"
        )


def _export_edge() -> None:
    config = edge.EdgeConfig(FLAGS.format, FLAGS.quantization, FLAGS.io_type)
    result = export_run.export_edge_files(
        FLAGS.model,
        config,
        out_dir=FLAGS.output_dir,
        base_dir=FLAGS.base_dir,
        model_name=FLAGS.model_name,
        class_names=FLAGS.class_names,
        images=FLAGS.images,
        eval_data=FLAGS.eval_data,
        calibration_data=FLAGS.calibration_data,
        max_images=FLAGS.max_images,
        overwrite=FLAGS.overwrite,
        max_bad_fraction=FLAGS.max_bad_fraction,
    )
    print(edge.summary(result))


if __name__ == "__main__":
    tlkeras.cli.run(main, exit_now=True)
