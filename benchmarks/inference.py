"""Inference throughput: the exported SavedModel's signatures against ``model.predict``.

MobileNet(alpha=0.25) at 224² with the shared ImageNet weights, on the shared ants/bees photos:

- ``keras model.predict (pixels)``: the in-memory Keras model on already-decoded pixels;
- ``keras decode + predict``: the same, timing the training pipeline's decode/resize too;
- ``SavedModel serving_float``: the exported float signature on already-decoded pixels;
- ``SavedModel serving_default``: the exported bytes signature on encoded JPEGs (decode in graph).

Each is warmed up once, then timed over ``repeats`` passes; the median pass gives images/s.
Run: ``python benchmarks/inference.py [--quick]``. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PHOTOS = SHARED / "data" / "hymenoptera" / "train"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
SIZE = (224, 224)
BATCH_SIZE = 32


def _photos(n: int) -> list[bytes]:
    files = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise FileNotFoundError(f"expected the shared photos under {PHOTOS}, found none")
    return [files[i % len(files)].read_bytes() for i in range(n)]


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: tracing, graph optimisation, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time the four paths; returns one dict per path (name, images, batch_size, seconds, images_per_s)."""
    import tensorflow as tf

    import tlkeras
    from tlkeras import data as data_lib
    from tlkeras.exports import signatures

    n, repeats = (64, 2) if quick else (256, 5)
    weights = str(WEIGHTS) if WEIGHTS.is_file() else None
    model = tlkeras.build_model(
        "MobileNet", 2, weights=weights, input_shape=(*SIZE, 3), backbone_kwargs={"alpha": 0.25}
    )
    images = _photos(n)
    batches = [images[i : i + BATCH_SIZE] for i in range(0, n, BATCH_SIZE)]
    decode = tf.function(
        lambda b: tf.map_fn(
            lambda x: tf.cast(data_lib.decode_image(x, SIZE), tf.float32),
            b,
            fn_output_signature=tf.TensorSpec([*SIZE, 3], tf.float32),
        )
    )
    pixels = [decode(tf.constant(b)).numpy() for b in batches]

    with tempfile.TemporaryDirectory(prefix="tlkeras-bench-") as tmp:
        result = tlkeras.export(
            model, "bench", base_dir=tmp, class_names=["ants", "bees"], verify=False
        )
        exported = tlkeras.load_exported(result.path)
        float_sig = exported.signatures[signatures.FLOAT_SIGNATURE]
        bytes_sig = exported.signatures[signatures.BYTES_SIGNATURE]
        float_inputs = [tf.constant(p) for p in pixels]
        bytes_inputs = [tf.constant(b, tf.string) for b in batches]
        paths = {
            "keras model.predict (pixels)": lambda: [
                model.predict(p, batch_size=BATCH_SIZE, verbose=0) for p in pixels
            ],
            "keras decode + predict": lambda: [
                model.predict(decode(b), batch_size=BATCH_SIZE, verbose=0) for b in bytes_inputs
            ],
            "SavedModel serving_float": lambda: [float_sig(images=p) for p in float_inputs],
            "SavedModel serving_default (JPEG bytes)": lambda: [
                bytes_sig(image_bytes=b)["probabilities"].numpy() for b in bytes_inputs
            ],
        }
        rows = []
        for name, fn in paths.items():
            seconds = _time(fn, repeats)
            rows.append(
                {
                    "name": name,
                    "images": n,
                    "batch_size": BATCH_SIZE,
                    "seconds": round(seconds, 4),
                    "images_per_s": round(n / seconds, 1),
                    "weights": "imagenet" if weights else "random",
                    "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'path':<{width}}  {'images/s':>9}  {'s/pass':>7}", "-" * (width + 20)]
    lines += [
        f"{r['name']:<{width}}  {r['images_per_s']:>9.1f}  {r['seconds']:>7.3f}" for r in rows
    ]
    r = rows[0]
    lines.append(
        f"MobileNet(alpha=0.25) {SIZE[0]}x{SIZE[1]}, {r['images']} images, batch {r['batch_size']}, "
        f"{r['weights']} weights, {r['device']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images, 2 timed passes")
    print(format_table(run(quick=parser.parse_args().quick)))
