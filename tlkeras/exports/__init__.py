"""exports: export layout, serving signatures, SavedModel, verification, edge, loading

Sits on ``analysis`` (calibration, Grad-CAM and TTA go into the signatures) and below.

- ``layout``: the directories and file names of an export.
- ``signatures``: the serving contract (decoding in the graph, the head, the signatures).
- ``savedmodel``: ``export``, a SavedModel TF Serving serves unchanged; ``verify``: checked in a
  fresh process.
- ``edge``, ``edge_formats``, ``edge_convert``, ``edge_verify``, ``edge_runtime``: TFLite and ONNX.
- ``loading``: ``load_exported`` and predicting with an export.
"""
