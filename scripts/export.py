"""Export a trained Keras model as a TF-Serving SavedModel: ``<base_dir>/<model_name>/<version>/``.

    python scripts/export.py --model=runs/ants_bees/model.keras --model_name=ants_bees \
        --images=../shared/data/hymenoptera/train/ants

``--model`` is a ``.keras`` file (loaded with Keras ``safe_mode``) or a training run directory holding
``model.keras``; class names come from ``--class_names`` or the run's ``metrics.json``. The export is
verified in a fresh process before its version directory appears.
"""

from absl import flags, logging

import tlkeras.cli
from tlkeras import exported, layout, savedmodel, signatures

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model", None, "A .keras model file, or a run directory containing model.keras."
)
flags.DEFINE_string("model_name", None, "Model name: the folder under --base_dir and the URL name.")
flags.DEFINE_string("base_dir", layout.DEFAULT_BASE_DIR, "SavedModel base directory.")
flags.DEFINE_list(
    "class_names", None, "Class names in output order (default: the run's metrics.json)."
)
flags.DEFINE_integer("version", None, "Version number (default: the next free one).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace an existing --version.")
flags.DEFINE_integer(
    "top_k", signatures.DEFAULT_TOP_K, "Classes returned per image.", lower_bound=1
)
flags.DEFINE_multi_string(
    "images", [], "Image files or folders for verification and TF Serving warmup."
)
flags.DEFINE_integer("max_images", 8, "At most this many --images are used.", lower_bound=1)
flags.DEFINE_bool("verify", True, "Verify the export in a fresh process.")
flags.mark_flags_as_required(["model", "model_name"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"expected no positional arguments, received {argv[1:]}")
    if not FLAGS["verbosity"].present:  # tf.saved_model.save logs every asset at INFO
        logging.set_verbosity(logging.WARNING)
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
    )
    print(f"exported {result.model_name} version {result.version} to {result.path}")
    if result.verification:
        v = result.verification
        print(
            "verified in a fresh process: max abs diff "
            f"float {v['serving_float_max_abs_diff']:.2e}, bytes {v['serving_default_max_abs_diff']:.2e} "
            f"on {v['num_images']} images"
        )


if __name__ == "__main__":
    tlkeras.cli.run(main, exit_now=True)
