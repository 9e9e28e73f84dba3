"""models: the backbone table, blocks, strategies, head tasks, the model builder, weights=

The bottom layer: it imports no other tlkeras layer.

- ``backbones``: the table of the 40 ``keras.applications`` models (constructor, preprocessing,
  input sizes, family).
- ``blocks``: a backbone's layers split into its family's natural units, by name and graph.
- ``strategy``: which blocks train (scratch, feature_extraction, partial, full), the BatchNorm rules.
- ``task``: what a head task means for the output layer, the loss, the metrics and the labels.
- ``spec``: ``HeadConfig``, ``AugmentConfig``, ``ModelSpec``: a model as data.
- ``builder``: ``build_model``, the classifier with its named layers.
- ``weights``: what a ``weights=`` value means, without training or loading anything.
"""
