"""tlkeras: transfer learning and fine-tuning of Keras Applications image classifiers.

Where each concept lives:
- backbones (the table of 40 keras.applications models): ``tlkeras.backbones``
- blocks (a backbone split into its natural units):       ``tlkeras.blocks``
- strategies (which blocks train):                        ``tlkeras.strategy``
- the model and its head:                                 ``tlkeras.model``
"""

from tlkeras import _quiet  # noqa: F401  (must run before TensorFlow is imported)
from tlkeras.backbones import BackboneSpec, backbone_names, build_backbone, get_backbone
from tlkeras.blocks import Block, block_names, blocks
from tlkeras.model import AugmentConfig, HeadConfig, ModelSpec, build_model, get_spec
from tlkeras.strategy import Strategy, apply_strategy

__version__ = "0.1.0"

__all__ = [
    "AugmentConfig",
    "BackboneSpec",
    "Block",
    "HeadConfig",
    "ModelSpec",
    "Strategy",
    "__version__",
    "apply_strategy",
    "backbone_names",
    "block_names",
    "blocks",
    "build_backbone",
    "build_model",
    "get_backbone",
    "get_spec",
]
