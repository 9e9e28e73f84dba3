"""The backbone table: every ``keras.applications`` image model as a row of data.

A *family* says how its models preprocess pixels and how their layers group into blocks (see
``tlkeras.models.blocks``); a *backbone* row adds the constructor, default and minimum input size. 40 models are
40 rows, not 40 code paths: ``build_backbone`` and the block splitter read only this table.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import keras

# How each family's own `preprocess_input` maps raw 0–255 RGB pixels. "internal": the model rescales and
# normalises inside its graph (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3), so the function is the
# identity. Recorded so exports and reports can say what the model expects.
PREPROCESS_MODES = ("caffe", "tf", "torch", "internal")


@dataclass(frozen=True)
class BlockRule:
    """A layer whose name matches ``pattern`` belongs to the block named ``template.format(*groups)``."""

    pattern: str
    template: str = "{0}"

    def match(self, layer_name: str) -> str | None:
        m = re.search(self.pattern, layer_name)
        return self.template.format(*m.groups()) if m else None


@dataclass(frozen=True)
class Family:
    """What a group of related backbones shares: module, preprocessing and block pattern."""

    name: str
    module: str  # keras.applications submodule holding `preprocess_input`
    preprocess_mode: str
    block_rules: tuple[BlockRule, ...]
    block_unit: str  # the natural unit, for docs and error messages

    def __post_init__(self) -> None:
        if self.preprocess_mode not in PREPROCESS_MODES:
            raise ValueError(
                f"Family {self.name}: expected preprocess_mode in {PREPROCESS_MODES}, "
                f"received {self.preprocess_mode!r}"
            )

    @property
    def preprocess(self) -> Callable[[Any], Any]:
        return getattr(keras.applications, self.module).preprocess_input

    def block_of(self, layer_name: str) -> str | None:
        for rule in self.block_rules:
            key = rule.match(layer_name)
            if key is not None:
                return key
        return None


@dataclass(frozen=True)
class BackboneSpec:
    """One row: a ``keras.applications`` constructor and its input sizes."""

    name: str
    family: Family
    default_size: int
    min_size: int = 32
    # Constructor arguments only some rows accept, applied unless the user overrides them.
    default_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def constructor(self) -> Callable[..., keras.Model]:
        return getattr(keras.applications, self.name)

    @property
    def preprocess(self) -> Callable[[Any], Any]:
        return self.family.preprocess

    @property
    def preprocess_mode(self) -> str:
        return self.family.preprocess_mode


_R = BlockRule
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("vgg", "vgg16", "caffe", (_R(r"^(block\d+)_"),), "blockN (convs + pool)"),
        Family("resnet", "resnet", "caffe", (_R(r"^(conv\d_block\d+)_"),), "convN_blockM"),
        Family("resnet_v2", "resnet_v2", "tf", (_R(r"^(conv\d_block\d+)_"),), "convN_blockM"),
        Family("xception", "xception", "tf", (_R(r"^(block\d+)_"),), "blockN"),
        Family("inception_v3", "inception_v3", "tf", (_R(r"^(mixed\d+)(?:_\d+)?$"),), "mixedN"),
        Family(
            "inception_resnet_v2",
            "inception_resnet_v2",
            "tf",
            (_R(r"^(mixed_\d[a-z])$"), _R(r"^(block(?:35|17|8)_\d+)(?:_|$)")),
            "mixed_Nx / blockK_M",
        ),
        Family(
            "mobilenet",
            "mobilenet",
            "tf",
            (_R(r"^conv_(?:dw|pw|pad)_(\d+)", "conv_{0}"),),
            "conv_dw_k+conv_pw_k",
        ),
        Family(
            "mobilenet_v2", "mobilenet_v2", "tf", (_R(r"^(expanded_conv|block_\d+)_"),), "block_k"
        ),
        Family(
            "mobilenet_v3",
            "mobilenet_v3",
            "internal",
            (_R(r"^(expanded_conv(?:_\d+)?)_"),),
            "expanded_conv_k",
        ),
        Family(
            "densenet",
            "densenet",
            "torch",
            (_R(r"^(conv\d_block\d+)_"), _R(r"^(pool[2-9])_", "transition_{0}")),
            "convN_blockM / transition",
        ),
        Family(
            "nasnet",
            "nasnet",
            "tf",
            # Cell ids are suffixes: `..._stem_1` (reduction stem cells), `..._reduce_4`, `..._5` (normal).
            (
                _R(r"_(stem_\d+)$", "cell_{0}"),
                _R(r"_(reduce_\d+)$", "cell_{0}"),
                _R(r"^(?:.*normal.*|adjust_.*)_(\d+)$", "cell_normal_{0}"),
            ),
            "cell",
        ),
        Family("efficientnet", "efficientnet", "internal", (_R(r"^(block\d+[a-z])_"),), "blockNx"),
        Family(
            "efficientnet_v2", "efficientnet_v2", "internal", (_R(r"^(block\d+[a-z])_"),), "blockNx"
        ),
        Family(
            "convnext",
            "convnext",
            "internal",
            (
                _R(r"_stage_(\d+)_block_(\d+)_", "stage{0}_block{1}"),
                _R(r"_downsampling_block_(\d+)$", "downsampling_{0}"),
            ),
            "stageN_blockM",
        ),
    )
}

_F = FAMILIES
_EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)
_EFFICIENTNET_V2_SIZES = {"B0": 224, "B1": 240, "B2": 260, "B3": 300, "S": 384, "M": 480, "L": 480}

BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec("VGG16", _F["vgg"], 224),
        BackboneSpec("VGG19", _F["vgg"], 224),
        *(BackboneSpec(f"ResNet{d}", _F["resnet"], 224) for d in (50, 101, 152)),
        *(BackboneSpec(f"ResNet{d}V2", _F["resnet_v2"], 224) for d in (50, 101, 152)),
        BackboneSpec("Xception", _F["xception"], 299, min_size=71),
        BackboneSpec("InceptionV3", _F["inception_v3"], 299, min_size=75),
        BackboneSpec("InceptionResNetV2", _F["inception_resnet_v2"], 299, min_size=75),
        BackboneSpec("MobileNet", _F["mobilenet"], 224),
        BackboneSpec("MobileNetV2", _F["mobilenet_v2"], 224),
        BackboneSpec("MobileNetV3Small", _F["mobilenet_v3"], 224),
        BackboneSpec("MobileNetV3Large", _F["mobilenet_v3"], 224),
        *(BackboneSpec(f"DenseNet{d}", _F["densenet"], 224) for d in (121, 169, 201)),
        BackboneSpec("NASNetMobile", _F["nasnet"], 224),
        BackboneSpec("NASNetLarge", _F["nasnet"], 331),
        *(
            BackboneSpec(f"EfficientNetB{i}", _F["efficientnet"], size)
            for i, size in enumerate(_EFFICIENTNET_SIZES)
        ),
        *(
            BackboneSpec(f"EfficientNetV2{v}", _F["efficientnet_v2"], size)
            for v, size in _EFFICIENTNET_V2_SIZES.items()
        ),
        *(
            BackboneSpec(f"ConvNeXt{v}", _F["convnext"], 224)
            for v in ("Tiny", "Small", "Base", "Large", "XLarge")
        ),
    )
}


def backbone_names() -> list[str]:
    """The names of all supported backbones, as spelled in ``keras.applications``."""
    return sorted(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """The table row for ``name``; a ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backbone: expected a name string, received {type(name).__name__}")
    spec = BACKBONES.get(name)
    if spec is None:
        by_lower = {n.lower(): n for n in BACKBONES}
        hint = f" (did you mean {by_lower[name.lower()]!r}?)" if name.lower() in by_lower else ""
        raise ValueError(
            f"backbone: expected one of {', '.join(backbone_names())}; received {name!r}{hint}"
        )
    return spec


def check_input_shape(
    spec: BackboneSpec, input_shape: tuple[int, int, int]
) -> tuple[int, int, int]:
    """Validate ``(height, width, 3)`` against the backbone's minimum size."""
    if len(input_shape) != 3 or any(not isinstance(d, int) for d in input_shape):
        raise ValueError(
            f"input_shape: expected (height, width, 3) integers, received {input_shape!r}"
        )
    h, w, c = input_shape
    if c != 3:
        raise ValueError(f"input_shape: expected 3 (RGB) channels, received {c} in {input_shape!r}")
    if min(h, w) < spec.min_size:
        raise ValueError(
            f"input_shape: {spec.name} expects height and width >= {spec.min_size}, "
            f"received {h}x{w}"
        )
    return (h, w, c)


_URL = re.compile(r"https?://\S+?\.h5")
# HDF5's own words for a file shorter than its superblock says: "eof = 1000, ..., stored_eof = 2108140".
_HDF5_TRUNCATED = re.compile(r"\beof = (\d+).*\bstored_eof = (\d+)")
_HDF5_SUFFIXES = (".h5", ".hdf5")
REDOWNLOAD = "delete it and download it again"


class BadFileError(ValueError):
    """A weights or model file that exists but cannot be read: truncated, empty or another kind."""


def _starts_with(path: Path) -> str:
    """``", it starts with '<!DOCTYPE html>…'"`` when the file begins as text (an error page saved
    in its place, a note), else nothing."""
    with open(path, "rb") as f:
        head = f.read(40)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    text = " ".join(text.split())
    return f", it starts with {text!r}" if text and text.isprintable() else ""


def file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with an existing weights or model file, in words, or ``None`` when it opens.

    ``.h5``/``.hdf5``/``.weights.h5`` files are opened with h5py: a truncated file is reported
    with the size its HDF5 superblock records (what the complete file has). ``.keras`` files must
    be zip archives. Other suffixes are left to Keras.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if path.suffix == ".keras":
        if zipfile.is_zipfile(path):
            return None
        return (
            f"is not a .keras archive (not a zip file: {size} bytes{_starts_with(path)}); "
            "a copy or download cut short, or another kind of file"
        )
    if path.suffix.lower() not in _HDF5_SUFFIXES:
        return None
    try:
        with h5py.File(path, "r"):
            return None
    except OSError as e:
        error = str(e)
    m = _HDF5_TRUNCATED.search(error)
    if m:
        return (
            f"is truncated: {int(m[1])} of {int(m[2])} bytes (the full size its HDF5 header "
            "records; an interrupted download?)"
        )
    if "signature" in error:
        return f"is not an HDF5 file ({size} bytes{_starts_with(path)})"
    return f"cannot be read by HDF5 ({error})"


def check_file(path: str | os.PathLike, what: str, advice: str = REDOWNLOAD) -> None:
    """Raise ``BadFileError`` ``"<what>: '<path>' <problem>; <advice>"`` for an unreadable file."""
    problem = file_problem(path)
    if problem is not None:
        raise BadFileError(f"{what}: {str(path)!r} {problem}; {advice}")


def _cache_dir() -> Path:
    from keras.src.backend.config import keras_home  # where keras.utils.get_file caches

    return Path(keras_home()) / "models"


def _bad_cache_files() -> list[str]:
    """``'<path>' <problem>`` for each unreadable file of Keras's ``models/`` cache."""
    folder = _cache_dir()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return [f"{str(p)!r} {problem}" for p in files if (problem := file_problem(p)) is not None]


def check_backbone_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Each constructor argument against the type of its default in the ``keras.applications``
    signature (``alpha`` a number, ``minimalistic`` a bool…); unknown names are Keras's to refuse."""
    parameters = inspect.signature(get_backbone(name).constructor).parameters
    for key, value in kwargs.items():
        default = parameters[key].default if key in parameters else None
        if default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "True or False"
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if isinstance(default, int):
                ok, expected = ok and isinstance(value, int), "an int"
            else:
                expected = "a number"
        elif isinstance(default, str):
            ok, expected = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ValueError(
                f"backbone_kwargs: {name} expects {key} to be {expected} (default "
                f"{default!r}), received {value!r} ({type(value).__name__})"
            )


def build_backbone(
    name: str,
    input_shape: tuple[int, int, int] | None = None,
    weights: str | None = "imagenet",
    **kwargs: Any,
) -> keras.Model:
    """The ``keras.applications`` model ``name`` without its top (``include_top=False``).

    ``weights``: ``"imagenet"`` (Keras's own download and ``$KERAS_HOME/models/`` cache), a path to a
    ``.h5``/``.weights.h5`` file, or ``None`` (random init). Constructor arguments such as MobileNet's
    ``alpha`` pass through ``kwargs``. A weights file that is truncated or not a weights file raises
    ``BadFileError`` naming it (a bad file in Keras's cache too).
    """
    spec = get_backbone(name)
    input_shape = check_input_shape(
        spec, tuple(input_shape) if input_shape else (spec.default_size, spec.default_size, 3)
    )
    if weights is not None and weights != "imagenet":
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"weights: expected 'imagenet', None or an existing .h5/.weights.h5 file, "
                f"received {weights!r} (no such file)"
            )
        check_file(weights, "weights")
    for reserved in ("include_top", "weights", "input_shape", "input_tensor", "classes"):
        if reserved in kwargs:
            raise ValueError(
                f"backbone_kwargs: {reserved!r} is set by tlkeras; expected constructor options "
                f"such as alpha, received {reserved}={kwargs[reserved]!r}"
            )
    check_backbone_kwargs(spec.name, kwargs)
    args = {**spec.default_kwargs, **kwargs}
    try:
        # The constructors load "imagenet" through keras.utils.get_file and a path through
        # model.load_weights, which reads both legacy .h5 and Keras 3 .weights.h5 files. At a size
        # they publish no weights for (image_size="auto" picks 96 for CIFAR), MobileNet and
        # MobileNetV2 load their 224 ones, which fit any size: their warning says nothing useful.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will be loaded as the default")
            model = spec.constructor(
                include_top=False, weights=weights, input_shape=input_shape, **args
            )
    except TypeError as e:
        raise TypeError(f"backbone_kwargs for {name}: {e}") from e
    except ValueError:
        raise
    except (OSError, zipfile.BadZipFile) as e:
        # A cached file whose hash Keras cannot check (MobileNet's has none; a mismatch is
        # downloaded again): h5py and zipfile do not name it, so name every bad one.
        bad = _bad_cache_files() if weights == "imagenet" else []
        if not bad:
            raise
        raise BadFileError(
            f"ImageNet weights for {name}: the Keras cache file {'; '.join(bad)}; delete it and "
            "Keras downloads it again (or put a good copy there)"
        ) from e
    except Exception as e:  # Keras raises a bare Exception when the download fails
        if weights != "imagenet":
            raise
        m = _URL.search(str(e))
        fname = m.group(0).rsplit("/", 1)[-1] if m else "(see the URL above)"
        raise FileNotFoundError(
            f"ImageNet weights for {name} could not be downloaded ({type(e).__name__}). Keras looked "
            f"for {fname!r}: put that file in {_cache_dir()}/ (KERAS_HOME is read when keras "
            f"is imported), or pass weights=PATH to a local file, or weights=None"
        ) from e
    return model
