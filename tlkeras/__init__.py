"""tlkeras: transfer learning and fine-tuning of Keras Applications image classifiers.

Where each concept lives (each module imports only the ones above it in this list):
- backbones (the table of 40 keras.applications models): ``tlkeras.backbones``
- model spec, head and augmentation configs:              ``tlkeras.spec``
- blocks (a backbone split into its natural units):       ``tlkeras.blocks``
- strategies (which blocks train, the BatchNorm rules):   ``tlkeras.strategy``
- head tasks (loss, metrics, labels, activation):         ``tlkeras.task``
- the model builder:                                      ``tlkeras.model``
- data in (folders, TFDS, arrays, digits; bad files):     ``tlkeras.data``
- the run directory (file names, state, history logs):    ``tlkeras.rundir``, ``tlkeras.reports``
- the fast frozen path (features computed once):          ``tlkeras.features``
- many devices and machines (tf.distribute):              ``tlkeras.distribute``
- augmentation presets (RandAugment, MixUp/CutMix):       ``tlkeras.augment``
- optimizers (per-block learning rates, schedules, EMA):  ``tlkeras.optimizers``
- phases (TrainConfig, Phase, the plan, run_phase):       ``tlkeras.phase``
- weights (imagenet, a file, None, source: pre-training): ``tlkeras.weights``
- the learning-rate range test (fastai's lr_find):        ``tlkeras.lr_finder``
- a run (run directory, resume, reports, train()):        ``tlkeras.training``
- strategy comparison and the offline transfer story:     ``tlkeras.transfer``
- which strategy / how many blocks:                       ``tlkeras.advisor``, ``tlkeras.sweep``
- an export's directories, versions and file names:       ``tlkeras.layout``
- serving signatures (in-graph decoding, the head):       ``tlkeras.signatures``
- verifying an export in a fresh process:                 ``tlkeras.verify``
- export (TF Serving SavedModels), ``tlkeras.export``:    ``tlkeras.savedmodel``
- edge export (TFLite float/float16/dynamic/int8, ONNX):  ``tlkeras.edge``
- loading exports and predicting; local serving:          ``tlkeras.exported``, ``tlkeras.serving``
- the scripts' flag helpers and one-line errors:          ``tlkeras.cli``
"""

from tlkeras import (  # noqa: F401
    _quiet,  # noqa: F401  (must run before TensorFlow is imported)
    data,
    distribute,
    features,
    transfer,
    weights,
)
from tlkeras.advisor import Advice, AdvisorConfig, advise, logme, rank_backbones
from tlkeras.backbones import BackboneSpec, backbone_names, build_backbone, get_backbone
from tlkeras.blocks import Block, block_names, blocks
from tlkeras.distribute import DistributeConfig, Distribution
from tlkeras.edge import EdgeConfig, EdgeExportResult, export_edge, export_onnx, export_tflite
from tlkeras.exported import load_exported
from tlkeras.lr_finder import LRFinderResult, find_lr
from tlkeras.model import AugmentConfig, HeadConfig, ModelSpec, build_model, get_spec
from tlkeras.phase import Phase, plan_phases, run_phase
from tlkeras.savedmodel import ExportResult, export
from tlkeras.strategy import Strategy, apply_strategy
from tlkeras.training import RunResult, TrainConfig, fit, train

__version__ = "0.1.0"

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
