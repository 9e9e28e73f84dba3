"""Decoding an encoded image exactly as a tlkeras export's serving signature does, and how many
classes an export answers with by default.

``decode_and_resize`` is the serving graph's decoding of one image (``tlkeras.exports.signatures``
maps it over the ``image_bytes`` batch): the byte and declared-pixel caps (``MAX_IMAGE_BYTES``,
``MAX_IMAGE_PIXELS``, read from the header before decoding), then the training pipeline's own
decoding and resizing (``tlkeras.data.decode_image``), so served and trained pixels are identical.
``reference_decode`` runs it eagerly on the client side: test-time augmentation over an export
(``tlkeras.analysis.tta``), edge exports and the export's verification decode bytes with it.
``DEFAULT_TOP_K`` is the number of classes and scores the signatures return per image unless told
otherwise (``TTAModel`` re-ranks with an export's own ``top_k``, this when it has none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tlkeras import _quiet  # noqa: F401  (TensorFlow without start-up chatter)

import tensorflow as tf  # noqa: E402  isort: skip

from tlkeras.data.files import decode_image  # noqa: E402

DEFAULT_TOP_K = 5
# Caps on one encoded image in the bytes signature (the pixel cap is the training scan's default).
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 40_000_000


def _declared_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width × height an encoded image declares in its header (0 for unknown formats), int64.

    Read before decoding so a decompression bomb (a tiny file declaring a huge canvas) is refused
    without allocating it. JPEG via TF's own SOF parser; the other formats' headers are fixed
    offsets (PNG IHDR, GIF logical screen, BMP info header, WebP VP8/VP8L/VP8X).
    """
    head = tf.strings.substr(tf.strings.join([data, tf.constant(b"\0" * 32)]), 0, 32)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
    shr, band = tf.bitwise.right_shift, tf.bitwise.bitwise_and

    def le(i, n):
        return sum(b[i + j] * 2 ** (8 * j) for j in range(n))

    def be32(i):
        return b[i] * 2**24 + b[i + 1] * 2**16 + b[i + 2] * 2**8 + b[i + 3]

    def bmp():  # height is negative for top-down bitmaps
        w, h = le(18, 4), le(22, 4)
        return tf.abs(tf.where(w >= 2**31, w - 2**32, w)) * tf.abs(
            tf.where(h >= 2**31, h - 2**32, h)
        )

    def webp():
        chunk = tf.strings.substr(head, 12, 4)
        vp8 = band(le(26, 2), 0x3FFF) * band(le(28, 2), 0x3FFF)
        lossless = (1 + band(le(21, 2), 0x3FFF)) * (1 + band(shr(le(22, 4), 6), 0x3FFF))
        extended = (1 + le(24, 3)) * (1 + le(27, 3))
        return tf.case(
            [
                (tf.equal(chunk, b"VP8 "), lambda: vp8),
                (tf.equal(chunk, b"VP8L"), lambda: lossless),
                (tf.equal(chunk, b"VP8X"), lambda: extended),
            ],
            default=lambda: tf.constant(0, tf.int64),
        )

    def jpeg():
        return tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64))

    def starts(prefix: bytes, at: int = 0) -> tf.Tensor:
        return tf.equal(tf.strings.substr(head, at, len(prefix)), prefix)

    return tf.case(
        [
            (starts(b"\xff\xd8"), jpeg),
            (starts(b"\x89PNG"), lambda: be32(16) * be32(20)),
            (starts(b"GIF"), lambda: le(6, 2) * le(8, 2)),
            (starts(b"BM"), bmp),
            (tf.logical_and(starts(b"RIFF"), starts(b"WEBP", 8)), webp),
        ],
        default=lambda: tf.constant(0, tf.int64),
        exclusive=False,
    )


def decode_and_resize(
    data: tf.Tensor,
    image_size: tuple[int, int],
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tf.Tensor:
    """One encoded image (scalar tf.string) → float32 [H, W, 3] RGB pixels 0–255, graph-safe.

    The byte and declared-pixel caps are checked first; the decoding and resizing are the training
    pipeline's own (``tlkeras.data.decode_image``), so served and trained pixels are identical.
    """
    size = tf.strings.length(data)
    checks = [
        tf.debugging.Assert(size > 0, ["image is empty (0 bytes)"]),
        tf.debugging.Assert(size <= max_bytes, [f"image is larger than {max_bytes} bytes"]),
    ]
    with tf.control_dependencies(checks):
        pixels = _declared_pixels(data)
    cap = tf.debugging.Assert(
        pixels <= max_pixels, [f"image declares more than {max_pixels} pixels"]
    )
    with tf.control_dependencies([cap]):
        data = tf.identity(data)
    return tf.cast(decode_image(data, image_size), tf.float32)


def reference_decode(images: Sequence[bytes], image_size: tuple[int, int]) -> np.ndarray:
    """The training pipeline's decoding of ``images``, eagerly: float32 [N, H, W, 3]."""
    return np.stack([decode_and_resize(tf.constant(b), image_size).numpy() for b in images]).astype(
        "float32"
    )
