"""Image files: decoding (shared with serving), the checks of one file (header sniffing, size and
pixel caps, a trial decode, conversion notes), the threaded scan of many, and the walk of folders.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from tlkeras import progress
from tlkeras.data.config import SPLIT_FOLDERS, DataConfig, Skipped

# Formats ``tf.io.decode_image`` decodes, by Pillow's name for them (MPO: multi-picture JPEG that
# many cameras write; TF reads its first picture as a JPEG).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})
# OS / tool clutter skipped silently (but counted), as are names starting with ".".
IGNORED_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx"})
# Folders this large get a first line saying how many files are checked.
PROGRESS_MIN_FILES = 1000
# The header checks run in chunks of this many files per task (a task per file costs more than
# its check), on this many threads (file reads overlap; Pillow's header parsing holds the GIL).
SCAN_CHUNK = 256
SCAN_THREADS = 4
# Below this many bytes per declared pixel an over-cap image is a bomb rather than a big photo.
_BOMB_BYTES_PER_PIXEL = 0.01


# --------------------------------------------------------------------------------------------------
# Decoding, shared with serving so that training and inference see identical pixels.


def resize_image(image: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Resize ``[H, W, C]`` (or ``[B, H, W, C]``) pixels to ``image_size``; returns uint8.

    Bilinear with antialiasing (so downscaled photos do not alias), rounded to uint8: the cache then
    holds a quarter of the float32 bytes, and every path (folder, arrays, TFDS, serving) agrees.
    """
    image = tf.image.resize(tf.cast(image, tf.float32), image_size, "bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_image(contents: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Encoded bytes (JPEG/PNG/GIF/BMP/WebP, sniffed from the content, not the name) → uint8
    ``[H, W, 3]`` at ``image_size``. Grayscale/RGBA/CMYK/16-bit become 8-bit RGB; an animated GIF
    gives its first frame. Graph-safe (use it in ``tf.data`` maps and serving signatures)."""
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return resize_image(image, image_size)


# --------------------------------------------------------------------------------------------------
# File scan.


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _sniff(data: bytes) -> str:
    """Why bytes Pillow could not identify are not an image, for the skip reason."""
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "not an image (text/html)"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "unsupported format SVG/XML"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftyphevc"):
        return f"unsupported format {data[8:12].decode().upper()}"
    if head.startswith(b"%pdf"):
        return "not an image (application/pdf)"
    try:
        data[:4096].decode("utf-8")
        return "not an image (text/plain)"
    except UnicodeDecodeError:
        return f"not an image (unrecognised bytes {data[:8].hex()})"


def declared_dimensions(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` as an image header declares it (``None`` if no supported format reads
    it), without decoding and bypassing Pillow's bomb check (which hides the size)."""
    from PIL import Image

    for fmt in SUPPORTED_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and accept(data[:16]) is not True):
            continue
        try:
            width, height = factory(io.BytesIO(data)).size
            return int(width), int(height)
        except Exception:  # a header Pillow cannot read: try the next format
            continue
    return None


def _declared_size(data: bytes, fallback: str) -> str:
    """``WxH`` as the header declares it, or ``fallback``."""
    size = declared_dimensions(data)
    return f"{size[0]}x{size[1]}" if size else fallback


def _tf_error_text(error: Exception) -> str:
    text = str(getattr(error, "message", error))
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\]", "", text).strip()


def check_image_file(path: str | os.PathLike, config: DataConfig | None = None):
    """Check one file the way ``load`` does. Returns ``(reason, note)``: ``reason`` is None when the
    file is usable, ``note`` describes a conversion applied to a usable file (or None)."""
    config = config or DataConfig()
    reason, note, fmt, data = _check_header(path, config)
    if reason is not None:
        return reason, None
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return f"truncated/corrupt {fmt}: {_tf_error_text(e)}", None
    return None, note


def _check_header(path: str | os.PathLike, config: DataConfig):
    """Every check of :func:`check_image_file` but the trial decode: ``(reason, note, format,
    bytes)``; ``reason`` is None when the header passed."""
    from PIL import Image, UnidentifiedImageError

    def rejected(reason: str):
        return reason, None, None, None

    try:
        size = os.path.getsize(path)
        if size == 0:
            return rejected("zero-byte file")
        if size > config.max_file_bytes:
            return rejected(
                f"file too large: {size / 2**20:.1f} MiB, over the "
                f"{config.max_file_bytes / 2**20:.0f} MiB cap"
            )
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return rejected(f"unreadable: {e.strerror or e}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height), mode = image.format, image.size, image.mode
            animated = bool(getattr(image, "is_animated", False))
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        declared = _declared_size(data, f"{pixels.group(1) if pixels else '?'} pixels")
        return rejected(f"decompression bomb: declared {declared} in {size} bytes")
    except UnidentifiedImageError:
        return rejected(_sniff(data))
    except (OSError, SyntaxError, ValueError) as e:  # a known format whose header is cut or broken
        fmt = next((f for magic, f in _MAGIC if data.startswith(magic)), None)
        return rejected(f"truncated/corrupt {fmt}: {e}" if fmt else _sniff(data))
    if fmt not in SUPPORTED_FORMATS:
        return rejected(f"unsupported format {fmt} (expected one of JPEG, PNG, GIF, BMP, WebP)")
    if width * height > config.max_pixels:
        if size < width * height * _BOMB_BYTES_PER_PIXEL:
            return rejected(f"decompression bomb: declared {width}x{height} in {size} bytes")
        return rejected(
            f"image too large: {width}x{height} = {width * height / 1e6:.0f} MP, over the "
            f"{config.max_pixels / 1e6:.0f} MP cap"
        )
    return None, _conversion_note(Path(path).suffix.lower(), fmt, mode, animated), fmt, data


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WEBP"),
)
_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".jpg", ".jpeg", ".mpo"),
    "PNG": (".png",),
    "GIF": (".gif",),
    "BMP": (".bmp", ".dib"),
    "WEBP": (".webp",),
}
_MODE_NOTES = {
    "L": "grayscale → RGB",
    "LA": "grayscale+alpha → RGB (alpha dropped)",
    "RGBA": "RGBA → RGB (alpha dropped)",
    "PA": "palette+alpha → RGB (alpha dropped)",
    "P": "palette (indexed colours) → RGB",
    "CMYK": "CMYK → RGB",
    "I;16": "16-bit → 8-bit RGB",
    "I;16B": "16-bit → 8-bit RGB",
    "I": "32-bit → 8-bit RGB",
    "1": "1-bit → RGB",
}


def _conversion_note(suffix: str, fmt: str, mode: str, animated: bool) -> str | None:
    parts = []
    if suffix not in _EXTENSIONS[fmt]:
        parts.append(f"{fmt} named {suffix or '(no extension)'}")
    if animated:
        parts.append("animated: first frame used")
    if mode in _MODE_NOTES:
        parts.append(_MODE_NOTES[mode])
    return f"decoded as {fmt}: " + ", ".join(parts) if parts else None


def scan_files(paths: list[str], config: DataConfig, display_root: Path):
    """Check ``paths``. Returns (ok mask, skipped, notes), in ``paths`` order.

    Two passes, both parallel: the header checks (sizes, format, pixel caps) in chunks of files
    per thread, then one trial decode of every file that passed, with the input pipeline's own op
    in a ``tf.data`` map (no Python per file). A file that decode rejects is checked again on its
    own (:func:`check_image_file`), which names the reason; bad files are rare, so that costs
    nothing on a clean folder.
    """
    with progress.step("scan"):
        return _scan(paths, config, display_root)


def _scan(paths: list[str], config: DataConfig, display_root: Path):
    from PIL import Image

    def rel(p: str) -> str:
        return os.path.relpath(p, display_root)

    reasons: list[str | None] = [None] * len(paths)
    notes_at: list[str | None] = [None] * len(paths)
    chunks = [range(a, min(a + SCAN_CHUNK, len(paths))) for a in range(0, len(paths), SCAN_CHUNK)]

    def check_chunk(chunk: range) -> int:
        for i in chunk:
            reasons[i], notes_at[i], _, _ = _check_header(paths[i], config)
        return len(chunk)

    if len(paths) >= PROGRESS_MIN_FILES:
        progress.say(f"Checking {len(paths)} image files…")
    count = progress.Progress(len(paths), "Checking image files", "files")
    # Pillow's own bomb warnings are redundant with max_pixels; silenced for the scan (main thread
    # only touches the filter list, so the pool threads just read it).
    with warnings.catch_warnings(), ThreadPoolExecutor(SCAN_THREADS) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        done = 0
        for n in pool.map(check_chunk, chunks):
            done += n
            count.update(done)
    count.close()
    passed = [i for i, r in enumerate(reasons) if r is None]
    for i in _rejected_by_decode([paths[i] for i in passed]):
        reasons[passed[i]], notes_at[passed[i]] = check_image_file(paths[passed[i]], config)
    ok = np.array([r is None for r in reasons], bool)
    skipped = [Skipped(rel(p), r) for p, r in zip(paths, reasons, strict=True) if r is not None]
    notes = [
        Skipped(rel(p), n)
        for p, r, n in zip(paths, reasons, notes_at, strict=True)
        if r is None and n is not None
    ]
    return ok, skipped, notes


def _rejected_by_decode(paths: list[str]) -> list[int]:
    """Indices of ``paths`` that ``tf.io.decode_image`` (as the input pipeline calls it) rejects."""
    if not paths:
        return []

    def decode(path: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return index + 0 * tf.cast(tf.shape(image)[0], tf.int64)  # depends on the decode

    indices = np.arange(len(paths), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((paths, indices)).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )
    count = progress.Progress(len(paths), "Decoding image files", "files")
    decoded = np.zeros(len(paths), bool)
    for batch in ds.ignore_errors().batch(SCAN_CHUNK * 8):
        decoded[batch.numpy()] = True
        count.update(int(decoded.sum()))
    count.close()
    return np.flatnonzero(~decoded).tolist()


# --------------------------------------------------------------------------------------------------
# Folders.


def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError as e:
        raise ValueError(
            f"expected a readable folder, received {str(path)!r} ({e.strerror})"
        ) from e
    except OSError as e:
        raise ValueError(f"expected a readable folder, received {str(path)!r} ({e})") from e


def class_folders(root: Path) -> tuple[list[os.DirEntry], int, int]:
    """(class folders, ignored entries, loose files at the top level)."""
    folders, ignored, loose = [], 0, 0
    for entry in _list_dir(root):
        if _is_ignored(entry.name):
            ignored += 1
        elif entry.is_dir():
            folders.append(entry)
        else:
            loose += 1
    return folders, ignored, loose


def walk_files(folder: str) -> tuple[list[str], int]:
    """Regular files under ``folder`` (recursively, sorted), and how many entries were ignored
    (a hidden folder counts once)."""
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise):
        ignored += sum(_is_ignored(d) for d in dirnames)
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        for name in sorted(filenames):
            if _is_ignored(name):
                ignored += 1
            else:
                files.append(os.path.join(dirpath, name))
    return files, ignored


def _raise(error: OSError):
    raise ValueError(f"expected a readable folder, received {error.filename!r} ({error.strerror})")


def folder_layout(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "validation": ..., "test": ...}`` when ``root`` holds split folders."""
    folders, _, _ = class_folders(root)
    names = {f.name.lower(): Path(f.path) for f in folders}
    if "train" not in names or not set(names) <= set(SPLIT_FOLDERS):
        return None
    if "val" in names and "validation" in names:
        raise ValueError(
            f"split folders of {str(root)!r}: expected one of 'val' or 'validation', received both"
        )
    return {SPLIT_FOLDERS[k]: v for k, v in names.items()}
