"""A generated corpus of good and bad image files, shared by the tlkeras test modules.

Everything is written into a caller-owned folder (use pytest's ``tmp_path``) from Pillow and raw
bytes, so no binary fixtures live in the repository. ``CASES`` lists every awkward file a real image
folder contains; ``make_dataset`` writes a small learnable class-per-folder dataset and
``make_messy_dataset`` adds every case to it.

Each case says what ``tlkeras.data.load`` must do with it: ``expect`` is a substring of the skip
reason, ``DECODED`` when the file is a usable image (possibly converted), or ``IGNORED`` for hidden
and system files that are skipped silently but counted.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DECODED = "decoded"
IGNORED = "ignored"

# Distinct, easily separable colours: class i of a generated dataset is tinted with COLOURS[i].
COLOURS = ((220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 30), (160, 40, 200))


def picture(size: tuple[int, int] = (32, 32), colour: Sequence[int] = (200, 80, 40), seed: int = 0):
    """A smooth, noisy RGB picture (``size`` is (height, width)) tinted with ``colour``."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = ((xx / max(w - 1, 1) + yy / max(h - 1, 1)) * 40.0)[..., None]
    pixels = np.asarray(colour, np.float32) * 0.8 + ramp + rng.normal(0.0, 8.0, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG that declares ``width``x``height`` RGB pixels in well under 1 KiB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4, 9)  # 4 black rows; the rest is missing
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def _cut(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


def _animated_gif() -> bytes:
    frames = [picture(seed=i, colour=COLOURS[i]) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _png16() -> bytes:
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 60).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


@dataclass(frozen=True)
class Case:
    name: str  # file name (relative path inside a class folder)
    make: Callable[[], bytes]
    expect: str  # DECODED, IGNORED, or a substring of the skip reason


CASES: tuple[Case, ...] = (
    Case("truncated.jpg", lambda: _cut(encode(picture((64, 64)), "JPEG"), 0.6), "corrupt JPEG"),
    Case("cut_header.jpg", lambda: encode(picture((64, 64)), "JPEG")[:300], "corrupt JPEG"),
    Case("truncated.png", lambda: _cut(encode(picture((64, 64)), "PNG"), 0.5), "corrupt PNG"),
    Case("zero_bytes.jpg", lambda: b"", "zero-byte file"),
    Case(
        "page.jpg", lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "text/html"
    ),
    Case("notes.jpg", lambda: b"just some text, not a picture\n", "text/plain"),
    Case("png_named.jpg", lambda: encode(picture(), "PNG"), DECODED),
    Case("gif_named.jpg", lambda: encode(picture(), "GIF"), DECODED),
    Case("bmp_named.jpg", lambda: encode(picture(), "BMP"), DECODED),
    Case("animated.gif", _animated_gif, DECODED),
    Case("photo.webp", lambda: encode(picture(), "WEBP"), DECODED),  # TF >= 2.17 decodes WebP
    Case("scan.tiff", lambda: encode(picture(), "TIFF"), "unsupported format TIFF"),
    Case("grayscale.jpg", lambda: encode(picture().convert("L"), "JPEG"), DECODED),
    Case("rgba.png", lambda: encode(picture().convert("RGBA"), "PNG"), DECODED),
    Case("cmyk.jpg", lambda: encode(picture().convert("CMYK"), "JPEG"), DECODED),
    Case("sixteen_bit.png", _png16, DECODED),
    Case("one_pixel.png", lambda: encode(picture((1, 1)), "PNG"), DECODED),
    Case("tall_1x400.png", lambda: encode(picture((400, 1)), "PNG"), DECODED),
    Case("bomb.png", png_bomb, "decompression bomb: declared 50000x50000"),
    Case(".DS_Store", lambda: b"\x00\x00\x00\x01Bud1" + b"\x00" * 64, IGNORED),
    Case("Thumbs.db", lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 64, IGNORED),
    Case("._apple_double.jpg", lambda: b"\x00\x05\x16\x07" + b"\x00" * 60, IGNORED),
    Case(".hidden_dir/inside.jpg", lambda: encode(picture(), "JPEG"), IGNORED),
)

BAD_CASES = tuple(c for c in CASES if c.expect not in (DECODED, IGNORED))
DECODED_CASES = tuple(c for c in CASES if c.expect == DECODED)
IGNORED_CASES = tuple(c for c in CASES if c.expect == IGNORED)


def write_cases(folder: Path, cases: Iterable[Case] = CASES) -> dict[str, str]:
    """Write ``cases`` into ``folder``; returns {relative path: expect}."""
    folder = Path(folder)
    out = {}
    for case in cases:
        path = folder / case.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(case.make())
        out[case.name] = case.expect
    return out


def make_dataset(
    root: Path,
    classes: Sequence[str] | dict[str, int] = ("cats", "dogs"),
    per_class: int = 10,
    size: tuple[int, int] = (32, 32),
    fmt: str = "JPEG",
    seed: int = 0,
) -> Path:
    """A class-per-folder dataset of small tinted pictures (learnable: the tint is the class).

    ``classes`` is a list of names (``per_class`` images each) or a {name: count} dict.
    """
    root = Path(root)
    counts = classes if isinstance(classes, dict) else dict.fromkeys(classes, per_class)
    suffix = {"JPEG": ".jpg", "PNG": ".png"}.get(fmt, "." + fmt.lower())
    for c, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = picture(size, COLOURS[c % len(COLOURS)], seed=seed * 100_003 + c * 1_009 + i)
            (folder / f"{name}_{i:04d}{suffix}").write_bytes(encode(image, fmt))
    return root


def make_messy_dataset(root: Path, per_class: int = 120, size: tuple[int, int] = (32, 32)):
    """``make_dataset`` with every ``CASES`` file in the first class folder, plus system clutter.

    Returns (root, {"cats/<name>": expect}). ``per_class`` is large enough that the bad files stay
    under the default ``max_bad_fraction`` of 0.1.
    """
    root = make_dataset(root, ("cats", "dogs"), per_class=per_class, size=size)
    expected = {f"cats/{k}": v for k, v in write_cases(root / "cats").items()}
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "__MACOSX" / "cats").mkdir(parents=True)
    (root / "__MACOSX" / "cats" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    return root, expected


# Weights and model files that are not what their name says: {file name: words of the error}.
# A half-finished download is the common one; HDF5 records the full size in its header.
BAD_WEIGHTS = {
    "truncated.h5": "is truncated: ",
    "page.h5": "is not an HDF5 file",
    "empty.weights.h5": "is empty (0 bytes)",
    "not_a_zip.keras": "is not a .keras archive",
}


def hdf5_bytes(values: int = 20_000) -> bytes:
    """A small but real HDF5 file (one float32 dataset), as bytes."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f["kernel"] = np.arange(values, dtype=np.float32)
    return buffer.getvalue()


def write_bad_weights(folder: Path) -> dict[str, Path]:
    """Write every ``BAD_WEIGHTS`` file into ``folder``; returns {file name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = hdf5_bytes()
    contents = {
        "truncated.h5": full[: len(full) // 2],
        "page.h5": b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n",
        "empty.weights.h5": b"",
        "not_a_zip.keras": b"model weights, honest\n",
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


def truncated_keras_cache(home: Path, name: str = "mobilenet_2_5_224_tf_no_top.h5") -> Path:
    """``KERAS_HOME`` whose ``models/`` holds a half-downloaded ``name`` (the file Keras loads for
    ``MobileNet(alpha=0.25)`` at 224 px, which it caches without a hash to check)."""
    path = Path(home) / "models" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    full = hdf5_bytes()
    path.write_bytes(full[: len(full) // 2])
    return path
