"""tlkeras: transfer learning and fine-tuning of Keras Applications image classifiers.

Seven layers, each importing only from the ones listed before it (tests/test_package.py checks):
models (backbones, blocks, strategies, the builder) → data (sources, decoding, augmentation) →
fitting (phases, the runner, the feature cache, the run directory) → analysis (calibration,
Grad-CAM, TTA, audit, advisor) → exports (SavedModel, signatures, edge) → serving (the REST app) →
workflows (what the scripts call). ``tlkeras.cli`` holds the scripts' flags; ``tlkeras.checks`` the
argument checks every layer shares. The names below are the public API; the old flat module names
(``tlkeras.phase``, ``tlkeras.training`` …) still import (``tlkeras._compat``).
"""

import importlib

from tlkeras import (
    _compat,
    _quiet,  # noqa: F401  (must run before TensorFlow is imported)
)

_compat.install()

from tlkeras import data  # noqa: E402
from tlkeras.analysis.advisor import Advice, AdvisorConfig, advise, rank_backbones  # noqa: E402
from tlkeras.analysis.transferability import logme  # noqa: E402
from tlkeras.exports.edge import (  # noqa: E402
    EdgeConfig,
    EdgeExportResult,
    export_edge,
    export_onnx,
    export_tflite,
)
from tlkeras.exports.loading import load_exported  # noqa: E402
from tlkeras.exports.savedmodel import ExportResult, export  # noqa: E402
from tlkeras.fitting.config import Phase, TrainConfig  # noqa: E402
from tlkeras.fitting.distribute import DistributeConfig, Distribution  # noqa: E402
from tlkeras.fitting.lr_finder import LRFinderResult, find_lr  # noqa: E402
from tlkeras.fitting.plan import plan_phases  # noqa: E402
from tlkeras.fitting.run import RunResult  # noqa: E402
from tlkeras.fitting.runner import run_phase  # noqa: E402
from tlkeras.models.backbones import (  # noqa: E402
    BackboneSpec,
    backbone_names,
    build_backbone,
    get_backbone,
)
from tlkeras.models.blocks import Block, block_names, blocks  # noqa: E402
from tlkeras.models.builder import (  # noqa: E402
    AugmentConfig,
    HeadConfig,
    ModelSpec,
    build_model,
    get_spec,
)
from tlkeras.models.strategy import Strategy, apply_strategy  # noqa: E402
from tlkeras.workflows.training import fit, train  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    # The old flat names are bound by _compat.install(); these two were attributes of the flat
    # package only because scripts imported them: import them on first use.
    if name in ("cli", "serving"):
        return importlib.import_module(f"tlkeras.{name}")
    raise AttributeError(f"module 'tlkeras' has no attribute {name!r}")


__all__ = [
    "Advice",
    "AdvisorConfig",
    "AugmentConfig",
    "BackboneSpec",
    "Block",
    "DistributeConfig",
    "EdgeConfig",
    "EdgeExportResult",
    "Distribution",
    "ExportResult",
    "HeadConfig",
    "LRFinderResult",
    "ModelSpec",
    "Phase",
    "RunResult",
    "Strategy",
    "TrainConfig",
    "__version__",
    "advise",
    "apply_strategy",
    "backbone_names",
    "block_names",
    "blocks",
    "build_backbone",
    "build_model",
    "data",
    "distribute",
    "export",
    "export_edge",
    "export_onnx",
    "export_tflite",
    "find_lr",
    "features",
    "fit",
    "get_backbone",
    "get_spec",
    "load_exported",
    "logme",
    "plan_phases",
    "rank_backbones",
    "run_phase",
    "train",
    "transfer",
    "weights",
]
